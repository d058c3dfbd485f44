"""Device driver: MedTune's CLI with Flower and Ray made unimportable, as on the GPU machine."""

import importlib.abc
import sys


class _NoFlower(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("flwr", "ray"):
            raise ImportError(f"{name} is not on the device machine")
        return None


sys.meta_path.insert(0, _NoFlower())
from medtune.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
