"""A DICOM node the PACS sends series to: a C-STORE receiver (pynetdicom) that spools each series,
a durable queue in the audit database, and a worker that answers each complete series with the
site's model and sends the SR and Secondary Capture back into the PACS unasked."""
