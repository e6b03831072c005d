"""Run report: figures and the markdown/HTML page built from a training workdir."""
