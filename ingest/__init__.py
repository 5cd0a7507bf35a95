"""The edge: the pixel and the intake API, publishing raw events to Kafka."""
