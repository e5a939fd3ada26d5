"""Configuration, Ray connection and worker placement."""

from cluster.config import EngineConfig, ForestConfig, SearchConfig, load_config

__all__ = ["EngineConfig", "ForestConfig", "SearchConfig", "load_config"]
