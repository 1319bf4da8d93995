/// How `tidemark serve` writes its log lines on stderr.
///
/// `text` is for people reading a terminal or the journal; `json` is one JSON object per
/// line for log shippers (Loki, Elasticsearch, `jq`), where parsing free text breaks with
/// every rewording.
public enum LogFormat: String, Sendable, CaseIterable {
    case text
    case json
}
