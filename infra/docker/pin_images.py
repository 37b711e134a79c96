"""Pin the platform's images by digest: a tag can be pushed again, a digest names exactly one image, so a cluster runs
the image that was built and tested and nothing else.

    python infra/docker/pin_images.py base                                # the Dockerfile's FROM: its tag's digest now
    python infra/docker/pin_images.py image REGISTRY/vit-platform:0.1.0   # every manifest: the image you pushed

Digests come from ``docker buildx imagetools inspect`` (it asks the registry and pulls nothing; for a multi-platform
image, the digest of its index). Review the diff and commit it: tests/test_infra.py checks that every image is pinned.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = Path("infra/docker/Dockerfile")
MANIFESTS = (
    Path("infra/kuberay/rayjob-pipeline.yaml"),
    Path("infra/kuberay/raycronjob-pipeline.yaml"),
    Path("infra/mlflow/mlflow.yaml"),
)
IMAGE_NAME = "vit-platform"  # the manifests' images: this repository's image, whatever registry it is pushed to
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_FROM = re.compile(r"^(FROM\s+)(\S+?)(@sha256:[0-9a-f]{64})?(\s.*)?$", re.MULTILINE)
_IMAGE = re.compile(r"^(\s*-?\s*image:\s*)(\S*/)?" + IMAGE_NAME + r"[:@]\S*", re.MULTILINE)


def digest_of(reference: str) -> str:
    """The digest the registry holds for ``reference`` (a tag) now."""
    out = subprocess.run(
        ["docker", "buildx", "imagetools", "inspect", reference, "--format", "{{json .Manifest.Digest}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    digest = out.stdout.strip().strip('"')
    if out.returncode != 0 or not DIGEST.match(digest):
        sys.exit(f"no digest for {reference}: {(out.stderr or out.stdout).strip()}")
    return digest


def pin_base(root: Path) -> str:
    path = root / DOCKERFILE
    text = path.read_text()
    match = _FROM.search(text)
    if match is None:
        sys.exit(f"{path}: no FROM line")
    reference = match.group(2)
    pinned = f"{reference}@{digest_of(reference)}"
    path.write_text(_FROM.sub(lambda m: f"{m.group(1)}{pinned}{m.group(4) or ''}", text, count=1))
    return pinned


def pin_image(root: Path, reference: str) -> str:
    if "@" in reference or not reference.rsplit("/", 1)[-1].startswith(IMAGE_NAME + ":"):
        sys.exit(f"{reference}: expected REGISTRY/{IMAGE_NAME}:TAG (the tag you pushed)")
    pinned = f"{reference}@{digest_of(reference)}"
    for manifest in MANIFESTS:
        path = root / manifest
        text, count = _IMAGE.subn(lambda m: m.group(1) + pinned, path.read_text())
        if count == 0:
            sys.exit(f"{path}: no {IMAGE_NAME} image to pin")
        path.write_text(text)
    return pinned


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this file's)")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("base", help="pin the Dockerfile's FROM to the digest its tag names now")
    image = sub.add_parser("image", help="pin the manifests to the digest of an image you pushed")
    image.add_argument("reference", help=f"REGISTRY/{IMAGE_NAME}:TAG")
    args = parser.parse_args(argv)
    pinned = pin_base(args.root) if args.what == "base" else pin_image(args.root, args.reference)
    print(pinned)


if __name__ == "__main__":
    main()
