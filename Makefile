# Set-up and everyday commands. `make demo` and `make test` create .venv by themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[data,test]"
	touch $(STAMP)

# pytest exits 5 when it collected no test: that is a failure here too. Two workers, one test
# file each at a time (module fixtures are built once): XLA compiles and process start-ups are
# mostly single-threaded, so the two cores overlap them. The longest files are handed out first.
LONG_TESTS := tests/test_training.py tests/test_finetune.py tests/test_sharding.py \
	tests/test_pcav_mae.py tests/test_launch.py tests/test_cli.py tests/test_cloud_storage.py
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(LONG_TESTS) tests

demo: install
	$(BIN)/cavmae pretrain --config configs/demo.py --workdir workdir/demo
	$(BIN)/cavmae retrieval --workdir workdir/demo

lint: install
	$(BIN)/ruff check cavmae_jax input_pipeline tests bench configs launch
	$(BIN)/ruff format --check cavmae_jax input_pipeline tests bench configs launch

bench: install
	$(BIN)/python bench/model_throughput.py

clean:
	rm -rf $(VENV) workdir
