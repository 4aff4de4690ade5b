# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test lint bench-fmnist clean venv system-deps proto

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (no download at run time).
system-deps:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) \
	    || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	  else \
	    echo "note: Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist)"; \
	  fi; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed explicitly first so pip never pulls a multi-GB CUDA build here;
# the project itself only asks for torch>=2.6.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0" || $(PIP) install -q "torch>=2.6"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv system-deps
	$(VENV)/bin/fedmosaic demo --output runs/demo

# Two pytest workers (one per core of the 2-core CI machine): most of the suite's time is
# process-level tests waiting on servers and clients, which overlap well. --dist loadfile
# keeps each file on one worker, so its module fixtures (a Ray instance, a server) start once.
test: venv system-deps
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks examples

bench-fmnist: venv system-deps
	$(PY) benchmarks/fmnist_fedavg.py

# Recompile the committed protocol descriptor after editing the .proto (needs grpcio-tools);
# fedmosaic_pb2.py builds the message classes from it at import.
proto: venv
	cd src/fedmosaic/net/proto && ../../../../$(PY) -m grpc_tools.protoc -I. --descriptor_set_out=fedmosaic.binpb fedmosaic.proto

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
