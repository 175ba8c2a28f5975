"""qomni: a fast, streaming inference engine and server for Qwen3-Omni."""

from qomni.engine.config import EngineConfig
from qomni.events import AudioChunk, Finished, GenerateOutput, TextDelta, Usage
from qomni.omni import Omni
from qomni.options import GenerateOptions
from qomni.sampling import SamplingParams

__all__ = ["AudioChunk", "EngineConfig", "Finished", "GenerateOptions", "GenerateOutput", "Omni",
           "SamplingParams", "TextDelta", "Usage"]
