"""NCSN (v1) experiments: the techniques of Song & Ermon (2020) one by one."""
