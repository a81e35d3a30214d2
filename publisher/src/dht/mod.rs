//! DHT11/DHT22 frame decoding (work in progress: see issue 3).
