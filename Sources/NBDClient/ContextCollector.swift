/// Gathers the context names libnbd hands to an `nbd_opt_list_meta_context` callback.
///
/// Travels through the C callback's `user_data` as an unretained pointer, like
/// ``ExtentCollector``, and is only touched during the synchronous call.
final class ContextCollector {
    var names: [String] = []
}
