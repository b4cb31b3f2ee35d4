"""The sources, one per URL scheme: ``http.py``, ``hf.py`` (the Hub's API in ``hf_api.py``)
and ``oci.py`` (manifests, blobs and registry auth in the modules beside it).  Each turns a
parsed reference into verified blobs in the store through a ``Job`` (``base.py``); none
touches ``index.json``.
"""
