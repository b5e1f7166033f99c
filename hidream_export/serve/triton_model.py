"""The Triton Python-backend model behind every generated model.py: one engine folder, served.

Triton's Python backend imports this inside its stub process (one per model instance); it is never
imported anywhere else, because `triton_python_backend_utils` exists only there.

- initialize: read the settings from config.pbtxt (repository.ModelSettings), load and verify the
  engine folder on this instance's device (a GPU instance: ONNX Runtime's CUDA provider on that GPU,
  or the TensorRT backend there), decide batching (batching.load_model). Triton reports the model
  ready only after this returns, so readiness means "verified and loaded".
- execute: batching.serve_batch on the requests Triton's dynamic batcher gathered; a bad request gets
  its own error response (400), the others their images.
- metrics, on Triton's Prometheus endpoint beside its own: hidream_stage_seconds (histogram per stage:
  parse, tokenize, encode_*, transformer, scheduler, vae, postprocess, respond, total per run),
  hidream_run_images (images per transformer batch: the batching achieved), hidream_requests_total
  (by outcome: ok, rejected, failed) and hidream_requests_in_flight (requests being generated now;
  Triton's nv_inference_pending_request_count counts those still queued).
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils  # exists only inside Triton's Python backend

from hidream_export.runtime.backends import get_backend
from hidream_export.serve import protocol
from hidream_export.serve.batching import LoadedModel, load_model, serve_batch
from hidream_export.serve.repository import ModelSettings

# Seconds: from a tiny model's sub-millisecond stages to a large image's decode on a slow device.
STAGE_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 100.0]


class TritonPythonModel:
    """Triton's Python-backend interface (initialize / execute / finalize)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        settings = ModelSettings.from_parameters(config.get("parameters", {}), args["model_repository"])
        gpu = args.get("model_instance_kind") == "GPU"
        device = int(args.get("model_instance_device_id") or 0)
        backend, providers = settings.backend, list(settings.providers) or None
        if gpu and backend == "ort" and providers is None:
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        if backend == "trt":
            backend = get_backend("trt", device=device if gpu else 0)
        self.model: LoadedModel = load_model(
            settings.engine_dir, backend=backend, providers=providers, threads=settings.threads or None,
            verify=settings.verify, scheduler_flavour=settings.scheduler_flavour, batching=settings.batching,
            io_binding=None if settings.io_binding else False, lora_dir=settings.lora_dir or None)
        pb_utils.Logger.log_info(f"{self.name} ({args.get('model_instance_name')}): {self.model.pipe!r}; "
                                 f"{self.model.why}")

        labels = {"model": self.name}
        self._stage_family = pb_utils.MetricFamily(
            name="hidream_stage_seconds", description="Seconds per pipeline stage and call (one run serves a batch)",
            kind=pb_utils.MetricFamily.HISTOGRAM)
        self._stages: dict[str, object] = {}
        self._labels = labels
        runs = pb_utils.MetricFamily(name="hidream_run_images", description="Images per transformer batch",
                                     kind=pb_utils.MetricFamily.HISTOGRAM)
        limit = max(1, self.model.pipe.transformer_info.batch_range[1])
        self._run_images = runs.Metric(labels=labels, buckets=[float(b) for b in range(1, limit + 1)])
        requests = pb_utils.MetricFamily(name="hidream_requests_total", description="Requests answered, by outcome",
                                         kind=pb_utils.MetricFamily.COUNTER)
        self._requests = {o: requests.Metric(labels={**labels, "outcome": o}) for o in ("ok", "rejected", "failed")}
        in_flight = pb_utils.MetricFamily(name="hidream_requests_in_flight",
                                          description="Requests this model is working on now",
                                          kind=pb_utils.MetricFamily.GAUGE)
        self._in_flight = in_flight.Metric(labels=labels)
        self._families = (self._stage_family, runs, requests, in_flight)  # a family must outlive its metrics

    def execute(self, requests: list) -> list:
        self._in_flight.increment(len(requests))
        try:
            return self._execute(requests)
        finally:
            self._in_flight.increment(-len(requests))

    def _execute(self, requests: list) -> list:
        arrays, wanted = [], []
        for request in requests:
            fields = {}
            for tensor in protocol.INPUTS:
                value = pb_utils.get_input_tensor_by_name(request, tensor.name)
                fields[tensor.name] = None if value is None else value.as_numpy()
            arrays.append(fields)
            wanted.append(list(request.requested_output_names()))
        served = serve_batch(self.model, arrays, wanted)

        responses = []
        for outcome in served.outcomes:
            if outcome.outputs is not None:
                self._requests["ok"].increment(1)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, array) for name, array in outcome.outputs.items()]))
                continue
            self._requests["rejected" if outcome.client_error else "failed"].increment(1)
            code = pb_utils.TritonError.INVALID_ARG if outcome.client_error else pb_utils.TritonError.INTERNAL
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(outcome.error, code)))
        self._record(served)
        return responses

    def _record(self, served) -> None:
        for stage in served.timings.stages:
            metric = self._stages.get(stage)
            if metric is None:
                metric = self._stages[stage] = self._stage_family.Metric(labels={**self._labels, "stage": stage},
                                                                         buckets=STAGE_BUCKETS)
            for seconds in served.timings.values(stage):
                metric.observe(seconds)
        for images in served.runs:
            self._run_images.observe(float(images))

    def finalize(self) -> None:
        self.model = None
