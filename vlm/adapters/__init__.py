"""Model families by name (the `family` key of configs/family/*.yaml): one adapter class each."""

from vlm.adapters.base import FamilyAdapter
from vlm.adapters.gemma3 import Gemma3Adapter
from vlm.adapters.qwen2vl import Qwen2VLAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {adapter.name: adapter for adapter in (Qwen2VLAdapter, Gemma3Adapter)}
