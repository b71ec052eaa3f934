"""Files in, scans out: any input read within its budget into a :class:`~medcls.io.scan.Scan`
(DICOM, PNG/JPEG/TIFF/BMP, NIfTI), gathered into ordered series, and the one preprocessing
contract shared by training and inference. Nothing here knows a model."""
