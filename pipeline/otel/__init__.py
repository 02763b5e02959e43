"""OpenTelemetry ingestion: OTLP traces and logs in, schema events out.

``decode`` turns OTLP bodies (protobuf or JSON, as exporters and the Collector write them)
into plain spans and log records; ``mapping`` is the one place that says which span becomes
which event (GenAI conventions, their deprecated names, OpenInference, OpenLLMetry);
``ingest`` runs both and validates the result like any other event; ``receiver`` (OTLP/HTTP)
and ``kafka_source`` (the Collector's Kafka exporter topic) publish it.
"""
