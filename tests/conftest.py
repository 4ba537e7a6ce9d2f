"""Shared fixtures: the tiny random model (fast, fresh per test) and the embedded SmolLM2 (converted once).

Cached models live under `$POSTTRAIN_CACHE` if set, else ~/.cache/posttrain, so the one-off
GGUF conversion (~10 s) happens once per machine, not once per test session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.models.cache import cache_root
from posttrain.models.precision import cpu_supports_bf16
from posttrain.models.tiny import build_tiny_model, build_tiny_tokenizer, tiny_model_path
from process_groups import spawner


def pytest_collection_modifyitems(config, items):
    """Tests marked needs_bf16 are skipped, and say why, on a CPU without native bf16: posttrain
    refuses precision=bf16 there (models.precision), so they could only fail."""
    if cpu_supports_bf16():
        return
    skip = pytest.mark.skip(reason="this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag)")
    for item in items:
        if "needs_bf16" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def posttrain_cache() -> Path:
    """The cache root every built-in model resolves into for this session."""
    return cache_root()


@pytest.fixture
def tiny_tokenizer():
    """A fresh character-level ChatML tokenizer (pad == eos == <|im_end|>); builds in ~1 ms."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model_and_tokenizer():
    """A fresh seed-0 tiny Llama (fp32, tied embeddings) and its tokenizer; tests may mutate both."""
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=0), tokenizer


@pytest.fixture(scope="session")
def tiny_path(posttrain_cache: Path) -> Path:
    """The tiny model saved as an ordinary HF folder (`<cache>/tiny-random`)."""
    return tiny_model_path(posttrain_cache)


@pytest.fixture(scope="session")
def smollm2_path(posttrain_cache: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors HF folder, converted from GGUF once."""
    from posttrain.models.embedded import embedded_model_path

    return embedded_model_path(posttrain_cache)


@pytest.fixture
def spawn():
    """`spawn(cmd, **popen_kwargs)`: a subprocess in a process group of its own, killed with
    everything it started when the test ends, passed or failed (tests/process_groups.py)."""
    yield from spawner()


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the tiny model's matmuls are too small to share, a
    second thread only waits for the first, and on a busy machine that wait dominates (about
    7× slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
"""Where tests leave files for people to look at (browser screenshots); kept out of git."""


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by Selenium, shared by the session's browser tests.

    Skipped, with the missing package named, where Debian's `chromium` / `chromium-driver` or
    PyPI's `selenium` is absent (scripts/setup.sh installs them where it runs as root)."""
    import shutil

    missing = [name for name, found in (("chromium", shutil.which("chromium")),
                                        ("chromium-driver", shutil.which("chromedriver"))) if not found]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium (PyPI)")
    if missing:
        pytest.skip(f"needs a real browser: {', '.join(missing)} not installed (apt-get install chromium "
                    "chromium-driver; pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
