# Set-up and everyday commands. `make demo` and `make test` create their environments by
# themselves: .venv has the runtime and the data extra (what a user installs), .venv-test adds
# the test tools (PyTorch, libtpu, OpenCV, Jupyter ...).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TEST_VENV := .venv-test
TEST_BIN := $(TEST_VENV)/bin

.PHONY: install install-test test demo lint bench clean

install: $(VENV)/.installed
install-test: $(TEST_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[data]"
	touch $@

$(TEST_VENV)/.installed: pyproject.toml
	test -x $(TEST_BIN)/python || $(PYTHON) -m venv $(TEST_VENV)
	$(TEST_BIN)/python -m pip install -q --upgrade pip
	$(TEST_BIN)/python -m pip install -q -e ".[data,test]"
	touch $@

# pytest exits 5 when it collected no test: that is a failure here too. Two workers, one test
# file each at a time (module fixtures are built once): XLA compiles and process start-ups are
# mostly single-threaded, so the two cores overlap them. The longest files are handed out first.
LONG_TESTS := tests/test_cloud_storage.py tests/test_training.py tests/test_notebooks.py \
	tests/test_finetune.py tests/test_sharding.py tests/test_pcav_mae.py tests/test_launch.py \
	tests/test_cli.py tests/test_pretrained_commands.py tests/test_faults.py
test: install-test
	$(TEST_BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20 $(LONG_TESTS) tests

demo: install
	$(BIN)/cavmae prepare --demo 240 --output workdir/demo-data --workers 2
	$(BIN)/cavmae pretrain --config demo --workdir workdir/demo --config.data.dir=workdir/demo-data
	$(BIN)/cavmae retrieval --model workdir/demo/model --data workdir/demo-data --split train

lint: install-test
	$(TEST_BIN)/ruff check cavmae_jax input_pipeline tests bench launch
	$(TEST_BIN)/ruff format --check cavmae_jax input_pipeline tests bench launch

bench: install-test
	$(TEST_BIN)/python bench/model_throughput.py

clean:
	rm -rf $(VENV) $(TEST_VENV) workdir
