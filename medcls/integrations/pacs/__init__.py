"""A hospital's PACS over DICOMweb: the client (QIDO-RS, WADO-RS, STOW-RS), a study's review as
the series view answers it, the results as DICOM SR and Secondary Capture, and the page's
workspace."""
