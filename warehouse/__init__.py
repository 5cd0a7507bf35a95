"""ClickHouse: schema, the loader from Kafka, and the reads behind the CRM API."""
