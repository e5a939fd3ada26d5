"""Entry points: the ``forest`` CLI, the ``ray job submit`` build entrypoint."""

__all__: list[str] = []
