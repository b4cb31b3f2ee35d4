"""Engine-ready models (DESIGN section 8).

* :mod:`nekko_sm.models.formats` recognises how a manifest packages a model and plans, layer by
  layer, which file each layer becomes (or which tar to unpack, and where its paths go):
  the per-format rules are :mod:`~nekko_sm.models.layouts`, the plan records
  :mod:`~nekko_sm.models.plans`, the name checks :mod:`~nekko_sm.models.paths`.
* :mod:`nekko_sm.models.unpack` streams tar layers into the store, one blob per regular file,
  applying image layers in order with whiteouts, refusing hostile names: tars are read by
  :mod:`~nekko_sm.models.tarstream`, names kept in :mod:`~nekko_sm.models.tree`, and
  :mod:`~nekko_sm.models.view` lists the files the model shows.
* :mod:`nekko_sm.models.hfcache` lays Hugging Face entries out as huggingface_hub's own cache,
  backed by the same blobs.

Nothing here talks to the network; the store is used only through its public methods.
"""
