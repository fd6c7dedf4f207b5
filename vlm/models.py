"""Load a VLM from a model config (real checkpoint, full-size random architecture, or tiny twin) and
answer what experiments ask of it: visual grid, modules, visual token positions, chat prompts, logits."""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature

from common.errors import UsageError, check_choice
from common.geometry import Grid, Layout
from vlm.adapters import ADAPTERS, FamilyAdapter
from vlm.interventions import VISUAL, Read, forward, intervene
from vlm.twins import build_parts, chat_messages, ensure_twin, initialise_zero_weights

INITS = ("pretrained", "random")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")     # accelerate's automatic placements


@dataclass
class VLM:
    """A loaded model with its tokenizer and image processor.

    `grid` is the visual token grid (rows x cols, pixels per token) and `layout` the item geometry, both
    from the model config and checked against the loaded processor at load time.
    """

    name: str
    adapter: FamilyAdapter
    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    grid: Grid
    layout: Layout
    system_prompt: str

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the input embeddings run on (for a model split by `device_map`, accelerate's
        execution device of that first part; its weights may be offloaded)."""
        embeddings = self.model.get_input_embeddings()
        execution = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
        return torch.device(execution) if execution is not None else embeddings.weight.device

    @property
    def visual_embedding_module(self) -> torch.nn.Module:
        return self.adapter.visual_embedding_module(self.model)

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.adapter.decoder_layers(self.model)

    @property
    def attention_modules(self) -> list[torch.nn.Module]:
        """Each LM decoder layer's self-attention module, in layer order."""
        return self.adapter.attention_modules(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def image_token_id(self) -> int:
        return self.adapter.image_token_id(self.model)

    @property
    def n_visual_tokens(self) -> int:
        return self.grid.rows * self.grid.cols

    def check_layers(self, layers) -> list[int]:
        """Return `layers` as a list, or raise a UsageError naming the first one out of range."""
        layers = list(range(self.n_layers)) if layers in (None, "all") else [int(layer) for layer in layers]
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise UsageError(f"layer {layer} is out of range for {self.name}: allowed 0..{self.n_layers - 1}")
        return layers

    def chat_text(self, prompt: str) -> str:
        """The model's own chat template over the system prompt and one user turn (image, prompt), with the
        generation prompt added, as text."""
        return self.tokenizer.apply_chat_template(chat_messages(self.system_prompt, prompt),
                                                  add_generation_prompt=True, tokenize=False)

    def prompt_end_offset(self, prompt: str) -> int:
        """How many input tokens follow the prompt's last token in the chat-formatted input (0: the prompt's
        last token would be the last input token). The image comes before the prompt, so this does not depend
        on how many image tokens there are."""
        text = self.chat_text(prompt)
        end = text.rindex(prompt) + len(prompt)
        spans = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        last = max(i for i, (start, stop) in enumerate(spans) if start < end and stop > start)
        return len(spans) - 1 - last

    def encode(self, images, prompts) -> BatchFeature:
        """Inputs for one image per prompt, left-padded so the last position is every row's last token."""
        texts = [self.chat_text(p) for p in prompts]
        inputs = self.adapter.encode(self.tokenizer, self.image_processor, images, texts, self.n_visual_tokens)
        unk = self.tokenizer.unk_token_id
        if unk is not None and bool((inputs["input_ids"] == unk).any()):
            row = int((inputs["input_ids"] == unk).any(-1).nonzero()[0, 0])
            raise UsageError(f"prompt {prompts[row]!r} has words outside {self.name}'s vocabulary")
        return inputs.to(self.device)

    def visual_token_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, n_visual_tokens) sequence positions of each row's visual tokens, found from the image
        token id, in visual token order."""
        mask = input_ids == self.image_token_id
        counts = mask.sum(-1)
        if not bool((counts == self.n_visual_tokens).all()):
            raise ValueError(f"expected {self.n_visual_tokens} image tokens per row, found {counts.tolist()}")
        return mask.nonzero()[:, 1].reshape(input_ids.shape[0], self.n_visual_tokens)

    @torch.no_grad()
    def last_logits(self, inputs, visual_tokens: torch.Tensor | None = None, interventions=()) -> torch.Tensor:
        """(batch, vocab) float32 next-token logits at the last position; only that position is projected.

        `visual_tokens` (batch, tokens, hidden), when given, are used as the visual embeddings instead of
        running the vision tower on the inputs' pixels (an image's embeddings are computed once);
        `interventions` (vlm/interventions.py) apply to the forward."""
        return forward(self, inputs, interventions, visual_tokens, logits_to_keep=1).logits[:, -1].float()

    @torch.no_grad()
    def image_embeddings(self, images, batch_size: int, desc: str | None = None, device=None) -> torch.Tensor:
        """(n, tokens, hidden) visual embeddings of `images`, `batch_size` images per forward of the vision tower
        and projector (the prompt is empty: they see only the pixels). Each batch's result is moved to `device`
        (default: stays on the model's); `desc` shows a progress bar."""
        out = []
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch",
                          disable=True if desc is None else None):     # None: only on a terminal
            chunk = list(images[start:start + batch_size])
            tokens = self.visual_tokens(self.encode(chunk, [""] * len(chunk)))
            out.append(tokens if device is None else tokens.to(device))
        return torch.cat(out)

    @torch.no_grad()
    def visual_tokens(self, inputs) -> torch.Tensor:
        """(batch, tokens, hidden) visual embeddings of the inputs' images, tokens in row-major grid order."""
        tokens = self.adapter.read_visual_tokens(self.model, inputs, self.n_visual_tokens)
        if tokens is not None:              # a family whose visual embeddings are more than one module's output
            return tokens
        with intervene(self, [Read(VISUAL)]) as read:
            self.adapter.image_features(self.model, inputs)
        return read[VISUAL]


def resolve_device(device: str) -> torch.device:
    """`device` as a torch device. auto: cpu without CUDA; with several GPUs inside a Hydra multirun, job k takes
    GPU k mod count (parallel launchers, configs/hydra/launcher/gpus.yaml); else cuda."""
    if device == "auto":
        count = torch.cuda.device_count()
        if count == 0:
            return torch.device("cpu")
        if count > 1 and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return torch.device("cuda", HydraConfig.get().job.num % count)
        return torch.device("cuda")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"device={device} is not a device; allowed: auto, cpu, cuda, cuda:N") from err
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (resolved.index or 0) >= count:
            raise UsageError(f"device={device} but {count} CUDA GPU(s) are visible; use device=auto or device=cpu")
    return resolved


def load_model(cfg: DictConfig) -> VLM:
    """Load `cfg.model` on `cfg.device`. A twin is built first if needed; init=random builds the full-size
    architecture with random weights and no download; otherwise from_pretrained(path)."""
    mcfg = cfg.model
    check_choice("model family", mcfg.family, ADAPTERS)
    check_choice("model.init", mcfg.init, INITS)
    adapter = ADAPTERS[mcfg.family](mcfg.modules)
    device = resolve_device(cfg.device)
    dtype = getattr(torch, mcfg.dtype)
    grid, layout = Grid(**mcfg.grid), Layout(**mcfg.layout)
    problem = adapter.grid_error(grid, OmegaConf.to_container(mcfg.architecture, resolve=True))
    if problem:                             # before anything loads: the processor would resize the images
        raise UsageError(f"model {mcfg.name}: {problem}")

    if mcfg.init == "random":
        tokenizer, image_processor, config = build_parts(adapter, mcfg, cfg.system_prompt)
        with torch.device(device):
            model = adapter.model_class._from_config(config, dtype=dtype,
                                                     attn_implementation=mcfg.attn_implementation)
        initialise_zero_weights(model, config)
    else:
        placement = device_placement(cfg, adapter, device)
        path = str(ensure_twin(adapter, mcfg, cfg.system_prompt)) if mcfg.twin else _checked_path(mcfg.path, mcfg.get("made_by"))
        tokenizer, image_processor, model = _from_pretrained(adapter, path, mcfg, device, dtype, placement)
    model.eval().requires_grad_(False)
    tokenizer.padding_side = "left"
    adapter.fit_image_processor(image_processor, grid)
    vlm = VLM(mcfg.name, adapter, model, tokenizer, image_processor, grid, layout, cfg.system_prompt)
    _check_grid(vlm)
    return vlm


def _checked_path(path: str, made_by: str | None = None) -> str:
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UsageError(f"model.path {path!r} is not a checkpoint: no config.json")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        how = f"; it is made by `{made_by}`" if made_by else ""
        raise UsageError(f"model.path {path!r} does not exist{how}; give a local checkpoint directory or a hub id "
                         f"like Org/Name")
    return path


def device_placement(cfg: DictConfig, adapter: FamilyAdapter, device: torch.device) -> dict:
    """from_pretrained's placement arguments for `cfg.model`: {} (the whole model on `device`), or `device_map`
    (accelerate spreads the layers over the GPUs, CPU memory and disk), with `max_memory` ({device: size}) and
    <cache_dir>/offload/<model> for what goes to disk. On a machine without a GPU a
    device_map applies only with `max_memory` (a CPU / disk split); otherwise the model is on the CPU whole.
    UsageError for a device_map that is not one of accelerate's placements or a {module: device} dict covering
    the LM's decoder layers. Checked before anything loads."""
    mcfg = cfg.model
    device_map, max_memory = mcfg.get("device_map"), mcfg.get("max_memory")
    if device_map in (None, ""):
        return {}
    if OmegaConf.is_config(device_map):
        device_map = OmegaConf.to_container(device_map)
    if isinstance(device_map, str):
        check_choice("model.device_map", device_map, DEVICE_MAPS)
    elif isinstance(device_map, dict):
        layers = adapter.modules["decoder_layers"]
        placed = [key for key in device_map if key == "" or layers == key or layers.startswith(key + ".")
                  or key.startswith(layers + ".")]
        if not placed:
            raise UsageError(f"model.device_map places none of {mcfg.name}'s decoder layers ({layers}.*): give each "
                             f"module a device, or one of {', '.join(DEVICE_MAPS)}")
    else:
        raise UsageError(f"model.device_map={device_map!r}; allowed: null, {', '.join(DEVICE_MAPS)} or a "
                         "{module: device} mapping")
    if device.type != "cuda" and max_memory in (None, ""):
        return {}
    placement = {"device_map": device_map,
                 "offload_folder": str(Path(cfg.cache_dir) / "offload" / mcfg.name)}
    if max_memory not in (None, ""):
        memory = OmegaConf.to_container(max_memory) if OmegaConf.is_config(max_memory) else max_memory
        if not isinstance(memory, dict) or not memory:
            raise UsageError(f"model.max_memory={max_memory!r}: give {{device: size}}, e.g. {{0: 20GiB, cpu: 64GiB}}")
        placement["max_memory"] = {int(k) if str(k).isdigit() else str(k): v for k, v in memory.items()}
    return placement


def _from_pretrained(adapter, path, mcfg, device, dtype, placement: dict):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
        model = adapter.model_class.from_pretrained(path, dtype=dtype, attn_implementation=mcfg.attn_implementation,
                                                    **placement)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load model {mcfg.name!r} from {path!r} (no local copy and no hub access?): {first}") from err
    if not placement:
        model.to(device)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = adapter.chat_template()
    return tokenizer, image_processor, model


def _check_grid(vlm: VLM) -> None:
    rows, cols, ppt = vlm.adapter.visual_grid(vlm.model, vlm.image_processor, vlm.grid)
    expected = (vlm.grid.rows, vlm.grid.cols, vlm.grid.pixels_per_token)
    if (rows, cols, ppt) != expected:
        raise UsageError(f"model {vlm.name} makes a {rows} x {cols} visual grid of {ppt} px tokens, but its config "
                         f"says {expected[0]} x {expected[1]} of {expected[2]} px")


def model_loader(cfg: DictConfig) -> Callable[[], VLM]:
    """`get_vlm()` for an experiment: loads `cfg`'s model (load_model) on its first call and returns that same
    model on every later one, so an experiment that finds everything it needs cached never loads it."""
    return functools.cache(lambda: load_model(cfg))
