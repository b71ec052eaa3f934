"""Services outside the process: the PACS over DICOMweb (:mod:`~medcls.integrations.pacs`), the
audit store (:mod:`~medcls.integrations.audit`) and a Ray cluster
(:mod:`~medcls.integrations.ray`). Each starts nothing unless asked."""
