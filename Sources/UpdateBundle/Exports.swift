// UpdateBundle works on bundle files; the formats it reads and writes are
// BundleFormat's, and every user of one needs the other.
@_exported import BundleFormat
