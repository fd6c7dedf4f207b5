"""The twins' real vocabularies (vlm/vocabularies.py): the real ids of Qwen2-VL-7B-Instruct and gemma-3-4b-it,
their special tokens and embedding sizes in the twins' configs, the real chat templates, every setting's
chat prompt with exactly the grid's image tokens, and the cache's fetch/build being idempotent, atomic and
failing in one line."""

import functools
import hashlib
import importlib
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoConfig, AutoTokenizer

from common.cli import CONFIG_DIR
from common.errors import UsageError
from common.geometry import Grid, Layout
from data_gen.render import random_samples
from data_gen.settings import DIRECTIONS, Setting
from tests.helpers import load_twin, make_cfg
from vlm import vocabularies
from vlm.adapters import ADAPTERS
from vlm.adapters.base import CHAT_TEMPLATE_DIR
from vlm.models import load_model
from vlm.twins import build_parts
from vlm.vocabularies import VocabularyError

SYSTEM_PROMPT = "You are a helpful assistant. You respond in one token."
SETTINGS = sorted(path.stem for path in (Path(CONFIG_DIR) / "setting").glob("*.yaml"))
VOCABULARY_OF = {"tiny_qwen2vl": "qwen2vl", "tiny_gemma3": "gemma3", "tiny_qwen2_5vl": "qwen2_5vl",
                 "tiny_qwen3vl": "qwen3vl", "tiny_llava": "llava", "tiny_internvl3": "internvl3"}
QWEN_TIKTOKEN = vocabularies.VOCABULARIES["qwen2vl"].source
# sha256 of the chat_template strings of Qwen/Qwen2-VL-7B-Instruct (chat_template.json) and google/gemma-3-4b-it
# (tokenizer_config.json), JSON-decoded: what vlm/chat_templates/ must hold byte for byte
TEMPLATE_SHA256 = {
    "qwen2vl": "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb",
    "gemma3": "7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4",
}


@functools.cache
def vocab_root() -> Path:
    """The folder the twins' vocabularies live in (the configs' `vocabulary.dir`: `<cache_dir>/vocab`)."""
    roots = {Path(make_cfg(f"model={name}").model.vocabulary.dir) for name in VOCABULARY_OF}
    assert len(roots) == 1
    return roots.pop()


def test_qwen2vl_twin_has_the_real_ids():
    twin = load_twin("tiny_qwen2vl")
    tok = twin.tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == 151657
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tok("Hello world")["input_ids"] == [9707, 1879]                  # no bos: Qwen adds none
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(151643, 151657))
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == ("<|im_end|>", "<|endoftext|>", None, None)
    for text, ids in vocabularies.VOCABULARIES["qwen2vl"].reference_ids:
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
    config = twin.model.config
    assert (config.image_token_id, config.video_token_id) == (151655, 151656)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (151652, 151653)
    text = config.get_text_config()
    assert (text.vocab_size, text.bos_token_id, text.eos_token_id, text.pad_token_id) == (152064, 151643, 151645, 151643)
    assert twin.model.get_input_embeddings().num_embeddings == 152064
    assert twin.model.lm_head.out_features == 152064


def test_gemma3_twin_has_the_real_ids():
    twin = load_twin("tiny_gemma3")
    tok = twin.tokenizer
    assert type(tok).__name__ == "GemmaTokenizer" and len(tok) == 262145
    assert tok("red", add_special_tokens=False)["input_ids"] == [1192]
    assert tok("red")["input_ids"] == [2, 1192]                             # Gemma adds <bos> by default
    assert tok(" red", add_special_tokens=False)["input_ids"] == [2604]
    ids = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106,
           "<start_of_image>": 255999, "<end_of_image>": 256000, "<image_soft_token>": 262144}
    assert dict(zip(ids, tok.convert_tokens_to_ids(list(ids)), strict=True)) == ids
    assert (tok.image_token, tok.boi_token, tok.eoi_token) == ("<image_soft_token>", "<start_of_image>", "<end_of_image>")
    for text, want in vocabularies.VOCABULARIES["gemma3"].reference_ids:
        assert tok(text, add_special_tokens=False)["input_ids"] == want
    config = twin.model.config
    assert (config.image_token_index, config.boi_token_index, config.eoi_token_index) == (262144, 255999, 256000)
    text = config.get_text_config()
    assert (text.vocab_size, text.pad_token_id, text.eos_token_id, text.bos_token_id) == (262208, 0, 1, 2)
    assert twin.model.get_input_embeddings().num_embeddings == 262208


@pytest.mark.parametrize("name", ["qwen2vl", "gemma3"])
def test_chat_templates_are_the_real_ones(name):
    text = (CHAT_TEMPLATE_DIR / f"{name}.jinja").read_text()
    assert hashlib.sha256(text.encode()).hexdigest() == TEMPLATE_SHA256[name]


def test_chat_prompt_is_the_real_format(twin):
    prompt = "The color of the square to the left of the green square is"
    expected = {
        "qwen2vl": f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                   f"<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n",
        "gemma3": f"<bos><start_of_turn>user\n{SYSTEM_PROMPT}\n\n<start_of_image>{prompt}<end_of_turn>\n"
                  f"<start_of_turn>model\n",
    }
    assert twin.chat_text(prompt) == expected[twin.adapter.name]
    assert twin.tokenizer.chat_template == (CHAT_TEMPLATE_DIR / f"{twin.adapter.name}.jinja").read_text()


@pytest.mark.parametrize("setting_name", SETTINGS)
def test_every_setting_prompt_has_the_grids_image_tokens(twin, setting_name):
    """Every prompt of the setting (every item, every direction) in the chat template with the system prompt and
    the generation prompt, encoded with its image: exactly rows x cols image tokens (144 for Qwen's 12 x 12, 256
    for Gemma's 16 x 16), in one run between the vision start and end markers, and the rest decodes to the chat
    text with the placeholder expanded as the processor expands it (Gemma3Processor adds blank lines around
    the image)."""
    assert twin.system_prompt == SYSTEM_PROMPT
    expected = {"qwen2vl": 144, "gemma3": 256}[twin.adapter.name]
    assert twin.n_visual_tokens == expected
    setting = Setting.from_config(make_cfg(f"setting={setting_name}").setting)
    prompts = [setting.prompt(direction, item) for item in setting.items for direction in DIRECTIONS]
    white = Image.new("RGB", (twin.grid.width, twin.grid.height), "white")
    tok = twin.tokenizer
    start, end = {"qwen2vl": ("<|vision_start|>", "<|vision_end|>"),
                  "gemma3": ("<start_of_image>", "<end_of_image>")}[twin.adapter.name]
    start_id, end_id = tok.convert_tokens_to_ids([start, end])
    for first in range(0, len(prompts), 64):
        batch = prompts[first:first + 64]
        inputs = twin.encode([white] * len(batch), batch)
        positions = twin.visual_token_positions(inputs["input_ids"])     # raises unless `expected` per row
        for row, prompt in enumerate(batch):
            ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
            image = ids == twin.image_token_id
            assert int(image.sum()) == expected
            where = image.nonzero().flatten()
            assert int(where[-1] - where[0]) + 1 == expected                # one contiguous run
            assert int(ids[where[0] - 1]) == start_id and int(ids[where[-1] + 1]) == end_id
            if tok.unk_token_id is not None:
                assert tok.unk_token_id not in ids.tolist()
            chat = twin.chat_text(prompt)
            expanded = {"qwen2vl": chat.replace("<|image_pad|>", ""),
                        "gemma3": chat.replace("<start_of_image>", "\n\n<start_of_image><end_of_image>\n\n")}
            assert tok.decode(ids[~image]) == expanded[twin.adapter.name]
        assert positions.shape == (len(batch), expected)


def test_a_loaded_tokenizer_without_template_gets_the_repositorys(twin, tmp_path):
    """A checkpoint whose tokenizer has no chat template (like a bare tokenizer.json) is given the family's
    template from vlm/chat_templates/ when loaded."""
    source = Path(make_cfg(f"model={twin.name}").model.path).resolve()     # links must not be relative
    local = tmp_path / twin.name
    local.mkdir()
    for item in source.iterdir():
        if item.name not in ("chat_template.jinja", "chat_template.json"):
            (local / item.name).symlink_to(item)
    config = json.loads((source / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    loaded = load_model(make_cfg(f"model={twin.name}", "model.twin=null", f"model.path={local}"))
    assert loaded.tokenizer.chat_template == (CHAT_TEMPLATE_DIR / f"{twin.adapter.name}.jinja").read_text()
    assert loaded.chat_text("The object above the key is") == twin.chat_text("The object above the key is")


# --- the cache: fetch and build ------------------------------------------------------------------------------

@pytest.fixture
def qwen_source(tmp_path):
    """A vocabulary folder holding only the fetched qwen.tiktoken (copied from the twins' folder: no download)."""
    root = tmp_path / "vocab"
    source = vocabularies.fetch(QWEN_TIKTOKEN, vocab_root())
    (root / "sources").mkdir(parents=True)
    shutil.copy(source, root / "sources" / source.name)
    return root


def test_build_is_idempotent_and_leaves_no_temporary_files(qwen_source, monkeypatch):
    out = vocabularies.build("qwen2vl", qwen_source)
    stamp = json.loads((out / "vocabulary.json").read_text())
    assert stamp["source"]["sha256"] == QWEN_TIKTOKEN.sha256
    assert stamp["source"]["distributions"] == ["dashscope==2.0.2"]
    assert sorted(p.name for p in qwen_source.iterdir()) == ["qwen2vl", "sources"]
    mtime = (out / "tokenizer.json").stat().st_mtime_ns

    def no_rebuild(_recipe, _path):
        raise AssertionError("an up-to-date vocabulary was rebuilt")

    monkeypatch.setitem(vocabularies.BUILDERS, "tiktoken", no_rebuild)
    monkeypatch.setattr(vocabularies.subprocess, "run", lambda *a, **k: pytest.fail("fetched again"))
    assert vocabularies.build("qwen2vl", qwen_source) == out
    assert (out / "tokenizer.json").stat().st_mtime_ns == mtime
    tokenizer = vocabularies.load_tokenizer("qwen2vl", qwen_source)
    vocabularies.check("qwen2vl", tokenizer)


def test_a_failed_build_leaves_the_previous_state(qwen_source, monkeypatch):
    def broken(_recipe, _path):
        raise VocabularyError("broken on purpose")

    monkeypatch.setitem(vocabularies.BUILDERS, "tiktoken", broken)
    with pytest.raises(VocabularyError, match="broken on purpose"):
        vocabularies.build("qwen2vl", qwen_source)
    assert sorted(p.name for p in qwen_source.iterdir()) == ["sources"]


def test_a_tokenizer_with_wrong_ids_is_refused(qwen_source, monkeypatch):
    """The build checks the real ids before anything lands in the cache."""
    real = vocabularies.BUILDERS["tiktoken"]

    def shuffled(recipe, path):
        tokenizer = real(recipe, path)
        tokenizer.backend_tokenizer.add_special_tokens(["<|extra|>"])
        return tokenizer

    monkeypatch.setitem(vocabularies.BUILDERS, "tiktoken", shuffled)
    with pytest.raises(VocabularyError, match="not Qwen/Qwen2-VL-7B-Instruct's: 151658 tokens, not 151657"):
        vocabularies.build("qwen2vl", qwen_source)
    assert not (qwen_source / "qwen2vl").exists()


def test_a_failed_download_says_what_to_run_in_one_line(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout = 1, ""
        stderr = "ERROR: Could not find a version that satisfies the requirement dashscope==2.0.2\n"

    monkeypatch.setattr(vocabularies.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(VocabularyError) as err:
        vocabularies.fetch(QWEN_TIKTOKEN, tmp_path)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, UsageError)
    assert "dashscope==2.0.2" in message and "python -m vlm.vocabularies" in message
    assert "Could not find a version" in message
    assert list((tmp_path / "sources").iterdir()) == []                     # no partial file


def test_a_wrong_file_is_refused(tmp_path, monkeypatch):
    """A wheel whose file does not have the pinned sha256 (a changed upload) is refused, and nothing is kept."""
    def fake_download(command, **_kwargs):
        dest = Path(command[command.index("--dest") + 1])
        dest.mkdir(parents=True)
        with zipfile.ZipFile(dest / "dashscope-2.0.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("dashscope/resources/qwen.tiktoken", "IQ== 0\n")

        class Done:
            returncode, stdout, stderr = 0, "", ""
        return Done()

    monkeypatch.setattr(vocabularies.subprocess, "run", fake_download)
    with pytest.raises(VocabularyError, match="not the pinned") as err:
        vocabularies.fetch(QWEN_TIKTOKEN, tmp_path)
    assert "\n" not in str(err.value)
    assert list((tmp_path / "sources").iterdir()) == []


def test_a_missing_package_says_what_to_install(tmp_path, monkeypatch):
    real_import = importlib.import_module

    def without_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_gguf)
    with pytest.raises(VocabularyError, match=r"needs the `gguf` package: pip install gguf") as err:
        vocabularies.build("gemma3", tmp_path)
    assert "\n" not in str(err.value)


def test_the_command_builds_every_family_vocabulary_into_the_cache(capsys):
    """`python -m vlm.vocabularies CACHE` (what `make vocab` runs) on the twins' cache: every family config's
    recipe up to date, in the folder the twins' configs name."""
    assert vocabularies.main([str(vocab_root().parent)]) == 0
    out = capsys.readouterr().out.splitlines()
    names = sorted(vocabularies.VOCABULARIES)
    assert names == sorted(VOCABULARY_OF.values()) == sorted(ADAPTERS)
    assert out == [f"{name}: {vocab_root() / name}" for name in vocabularies.VOCABULARIES]
    for name in names:
        stamp = json.loads((vocab_root() / name / "vocabulary.json").read_text())
        assert stamp["fingerprint"] == vocabularies.VOCABULARIES[name].fingerprint()


def test_the_organism_keeps_its_word_level_vocabulary():
    """The first organism (no `vocabulary:` in its config) ships the small word-level tokenizer its weights were
    trained with: loaded from its directory, it has the model's embedding rows and spells every synthetic prompt
    and answer without an unknown token. (Its config now builds a different word-level tokenizer: the What'sUp
    answers became the dataset's names, which the word-level corpus includes; the shipped one is what counts.)"""
    cfg = make_cfg("model=organism")
    assert cfg.model.get("vocabulary") is None
    shipped = AutoTokenizer.from_pretrained(cfg.model.path)
    config = AutoConfig.from_pretrained(cfg.model.path)
    assert len(shipped) < 1000 and config.get_text_config().vocab_size == len(shipped)
    for name in ("squares", "shapes", "objects"):
        setting = Setting.from_config(make_cfg(f"setting={name}").setting)
        for sample in random_samples(setting, Grid(12, 12, 28), Layout(2, 2, 4), 8, seed=0):
            ids = shipped(sample.prompt + " " + sample.answer, add_special_tokens=False)["input_ids"]
            assert shipped.unk_token_id not in ids, sample.prompt
    tokenizer, _, built = build_parts(ADAPTERS[cfg.model.family](cfg.model.modules), cfg.model, cfg.system_prompt)
    assert built.get_text_config().vocab_size == len(tokenizer) < 1000


# --- the families beyond the paper's two ---------------------------------------------------------------------

# ids of each checkpoint's tokenizer_config.json / config.json (image_token_id or image_token_index)
NEW_FAMILY_IDS = {
    "tiny_qwen2_5vl": ({"<|image_pad|>": 151655, "<|vision_start|>": 151652, "<tool_call>": 151657,
                        "<|file_sep|>": 151664}, 151665, 152064),
    "tiny_qwen3vl": ({"<|image_pad|>": 151655, "<|im_end|>": 151645, "<think>": 151667, "</think>": 151668},
                     151669, 151936),
    "tiny_llava": ({"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}, 32002, 32064),
    "tiny_internvl3": ({"<img>": 151665, "</img>": 151666, "<IMG_CONTEXT>": 151667, "</box>": 151673,
                        "<|im_end|>": 151645}, 151674, 151674),
}
CHAT_PROMPTS = {   # the checkpoints' chat format around the system prompt and one user turn (image, prompt)
    "tiny_qwen2_5vl": "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
                      "<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n",
    "tiny_qwen3vl": "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
                    "<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n",
    "tiny_llava": "{system} USER: <image>\n{prompt} ASSISTANT:",
    "tiny_internvl3": "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\n{prompt}<|im_end|>\n"
                      "<|im_start|>assistant\n",
}


@pytest.mark.parametrize("name", sorted(NEW_FAMILY_IDS))
def test_new_family_twins_have_the_real_ids_and_chat_format(name):
    twin = load_twin(name)
    tok, (ids, size, rows) = twin.tokenizer, NEW_FAMILY_IDS[name]
    assert len(tok) == size and dict(zip(ids, tok.convert_tokens_to_ids(list(ids)), strict=True)) == ids
    vocabularies.check(VOCABULARY_OF[name], tok)                       # size, ids, reference encodings
    assert twin.image_token_id == ids[twin.adapter.image_token]
    assert twin.model.get_input_embeddings().num_embeddings == rows
    prompt = "The color of the square to the left of the green square is"
    assert twin.chat_text(prompt) == CHAT_PROMPTS[name].format(system=SYSTEM_PROMPT, prompt=prompt)
    white = Image.new("RGB", (twin.grid.width, twin.grid.height), "white")
    inputs = twin.encode([white], [prompt])
    real = inputs["input_ids"][0]
    assert int((real == twin.image_token_id).sum()) == twin.n_visual_tokens
    if name == "tiny_llava":                                           # LLaVA's processor adds LLaMA's <s> first
        assert int(real[0]) == 1 and tok.decode(real[1:]).replace("<image>" * 576, "<image>") == twin.chat_text(prompt)


def test_a_recipe_from_a_source_distribution_is_fetched_from_its_tarball(tmp_path, monkeypatch):
    """A source file inside an sdist (LLaVA's LLaMA vocabulary in llama-cpp-python's) is taken from the tarball pip
    downloads with --no-binary, and checked against its pin."""
    recipe = vocabularies.VOCABULARIES["llava"]
    chunk = recipe.source.chunks[0]
    assert chunk.dist == "sdist"
    real = vocabularies.fetch(recipe.source, vocab_root()).read_bytes()

    def fake_download(command, **_kwargs):
        assert "--no-binary=:all:" in command and f"{chunk.package}=={chunk.version}" in command
        dest = Path(command[command.index("--dest") + 1])
        dest.mkdir(parents=True)
        source = tmp_path / "file"
        source.write_bytes(real)
        with tarfile.open(dest / f"{chunk.package.replace('-', '_')}-{chunk.version}.tar.gz", "w:gz") as sdist:
            sdist.add(source, arcname=chunk.member)

        class Done:
            returncode, stdout, stderr = 0, "", ""
        return Done()

    monkeypatch.setattr(vocabularies.subprocess, "run", fake_download)
    target = vocabularies.fetch(recipe.source, tmp_path / "vocab")
    assert target.read_bytes() == real and target.name == recipe.source.filename
