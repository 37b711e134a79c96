"""``python -m pipelines.cli``: how a Ray Job and the KubeRay RayJob run `vit`."""

from pipelines.cli import main

main()
