"""Ray actors: GeneratorWorker (one vLLM engine each)."""

from actors.generator import GeneratorWorkerImpl, VLLMEngine, WorkerStats, start_generator_workers

__all__ = ["GeneratorWorkerImpl", "VLLMEngine", "WorkerStats", "start_generator_workers"]
