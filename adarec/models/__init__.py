"""Sequential recommenders: SASRec, ELCRec (and later ADARec)."""
