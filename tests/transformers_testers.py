"""Imports transformers' own common testers (`ModelTesterMixin`, `ConfigTester`, `ProcessorTesterMixin`) from the test
modules of the installed release, which scripts/install.sh unpacks into .cache/transformers-tests/<version>/ (the
wheel has no tests/; the release's source archive has them).

The archive ships tests/*.py but not the subfolders three of those modules import from; this module registers small
stand-ins for them before importing, each holding only the name imported:
- `exporters.test_export.ExportTesterMixin`: an empty mixin, so the export tests it would add (torch.export, ONNX,
  ExecuTorch, OpenVINO, TensorRT drives) are not part of the run;
- `generation.test_utils.GenerationTesterMixin`: an empty class (read only by an `issubclass` check for generative
  models; MQIRTN does not generate);
- `utils.test_configuration_utils.config_common_kwargs`: `{}` (read only by `ConfigTester.check_config_arguments_init`,
  which returns before reading it for composite configs such as MQIRTN's);
- `fetch_hub_objects_for_ci.url_to_local_path`: returns the URL (the fixtures it maps are Hub files, read only by the
  chat-template tests, which do not apply to MQIRTN).
"""

import os
import sys
import types
from pathlib import Path

import transformers


PACKAGE = "transformers_release_tests"
ROOT = Path(__file__).resolve().parent.parent / ".cache" / "transformers-tests" / transformers.__version__
# scripts/test.sh sets it: there a missing copy is an error, not a skip.
REQUIRED = os.environ.get("MQIRTN_REQUIRE_TRANSFORMERS_TESTS") == "1"


def missing_reason() -> str | None:
    """Why the testers cannot be imported, or None when they can."""
    if (ROOT / "COMPLETE").is_file():
        return None
    return (
        f"transformers {transformers.__version__}'s test modules are not unpacked in {ROOT}; "
        "run scripts/fetch_transformers_tests.sh (scripts/install.sh runs it)"
    )


def _module(name: str, **attributes) -> types.ModuleType:
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        module.__path__ = []  # a package, so that submodules can be registered below it
        sys.modules[name] = module
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def _register_stand_ins() -> None:
    _module(f"{PACKAGE}.exporters")
    _module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
    _module(f"{PACKAGE}.generation")
    _module(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
    _module(f"{PACKAGE}.utils")
    _module(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs={})
    _module("fetch_hub_objects_for_ci", url_to_local_path=lambda url: url)


def load():
    """`(test_modeling_common, test_configuration_common, test_processing_common)` modules of the installed release."""
    reason = missing_reason()
    if reason is not None:
        raise ImportError(reason)
    import importlib
    import importlib.util

    if PACKAGE not in sys.modules:  # the unpacked folder as a package of its own (sys.path stays as it is)
        folder = ROOT / PACKAGE
        spec = importlib.util.spec_from_file_location(
            PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    _register_stand_ins()

    return tuple(
        importlib.import_module(f"{PACKAGE}.{name}")
        for name in ("test_modeling_common", "test_configuration_common", "test_processing_common")
    )
