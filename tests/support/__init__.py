"""What the tests share besides fixtures (those are in conftest.py): paths, real photos, the stand-in
worker, process stacks, traffic books and the hostile corpus. Import as `from support.images import photo`."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
IMAGENET_INDEX = ROOT / "models" / "imagenet_class_index.json"  # a copy of ../shared/models' file
