"""Model families by name (the `family` key of configs/model/*.yaml)."""

from vlm.adapters.base import FamilyAdapter
from vlm.adapters.gemma3 import Gemma3Adapter
from vlm.adapters.qwen2vl import Qwen2VLAdapter

ADAPTERS: dict[str, FamilyAdapter] = {adapter.name: adapter for adapter in (Qwen2VLAdapter(), Gemma3Adapter())}
