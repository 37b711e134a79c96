"""``python -m pipelines.cli``: how a Ray Job and the KubeRay RayJob run `vit`."""

from __future__ import annotations

from pipelines.cli import main

main()
