"""Every `>>>` example in the package runs (a runnable example per public class). Examples that need the Hub
or data that is not here carry `# doctest: +SKIP`."""

import doctest
import importlib

import pytest


MODULES = [
    "modeling_mqirtn.configuration_mqirtn",
    "modeling_mqirtn.modeling_mqirtn",
    "modeling_mqirtn.composition_mqirtn",
    "modeling_mqirtn.fusion_mqirtn",
    "modeling_mqirtn.losses_mqirtn",
    "modeling_mqirtn.pipeline_mqirtn",
    "processing.processing_mqirtn",
    "processing.data.registry",
    "processing.data.loaders",
    "processing.data.folder_datasets",
    "processing.data.metrics",
    "processing.data.shapes",
    "processing.data.transforms",
    "mqirtn_app.index",
    "mqirtn_app.cli",
    "mqirtn_app.visualization",
    "mqirtn_app.model_card",
]


class FencedOutputChecker(doctest.OutputChecker):
    """Examples sit in markdown ```python fences (as in transformers); the closing fence is not expected output."""

    def check_output(self, want, got, optionflags):
        lines = want.rstrip("\n").split("\n")
        if lines and lines[-1].strip() == "```":
            want = "\n".join(lines[:-1]) + "\n" if lines[:-1] else ""
        return super().check_output(want, got, optionflags)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(FencedOutputChecker(), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, (
        f"{results.failed} of {results.attempted} docstring examples of {name} failed (output above)"
    )


def test_the_hub_modules_have_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    for name in (
        "modeling_mqirtn.configuration_mqirtn",
        "modeling_mqirtn.modeling_mqirtn",
        "processing.processing_mqirtn",
    ):
        examples = sum(len(test.examples) for test in finder.find(importlib.import_module(name)))
        assert examples > 0, f"{name} has no >>> example"
