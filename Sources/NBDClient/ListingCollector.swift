/// Gathers the exports libnbd hands to an `nbd_opt_list` callback.
///
/// Travels through the C callback's `user_data` as an unretained pointer, like
/// ``ExtentCollector``, and is only touched during the synchronous call.
final class ListingCollector {
    var exports: [NBDExportListing] = []
}
