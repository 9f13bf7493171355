"""FlexMoRE: federated experts against a frozen public base — upcycle, train, extract low-rank, merge, opt out."""
