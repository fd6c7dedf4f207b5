"""Model families by name (the `family` key of configs/family/*.yaml): one adapter class each."""

from vlm.adapters.base import FamilyAdapter
from vlm.adapters.gemma3 import Gemma3Adapter
from vlm.adapters.internvl3 import InternVL3Adapter
from vlm.adapters.llava import LlavaAdapter
from vlm.adapters.qwen2_5vl import Qwen2_5VLAdapter
from vlm.adapters.qwen2vl import Qwen2VLAdapter
from vlm.adapters.qwen3vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    adapter.name: adapter
    for adapter in (Qwen2VLAdapter, Gemma3Adapter, Qwen2_5VLAdapter, Qwen3VLAdapter, LlavaAdapter, InternVL3Adapter)
}
