// Which response bodies curl can decode (`decompress`): the codings its build supports, from libcurl's own
// feature list. curl fails a transfer whose Content-Encoding names any other (CURLE_BAD_CONTENT_ENCODING, 61) where
// Node's fetch hands the bytes on as they came; fetch() asks again without decoding then (SockpoolClient.fetch).

import { Curl } from 'node-libcurl';

/** curl_version_info's feature bits (curl/curl.h): node-libcurl's list of names has no zstd. */
const CURL_VERSION_LIBZ = 1 << 3;
const CURL_VERSION_BROTLI = 1 << 23;
const CURL_VERSION_ZSTD = 1 << 26;

function supportedCodings(): ReadonlySet<string> {
  const features = Curl.getVersionInfo().rawFeatures;
  const codings = new Set(['identity', 'none']);
  if (features & CURL_VERSION_LIBZ) for (const coding of ['gzip', 'x-gzip', 'deflate']) codings.add(coding);
  if (features & CURL_VERSION_BROTLI) codings.add('br');
  if (features & CURL_VERSION_ZSTD) codings.add('zstd');
  return codings;
}

let supported: ReadonlySet<string> | undefined;

/** Whether curl decodes a body with these response headers (no Content-Encoding, or only codings it knows). */
export function curlDecodes(headers: Array<[string, string]>): boolean {
  for (const [name, value] of headers) {
    if (name.toLowerCase() !== 'content-encoding') continue;
    supported ??= supportedCodings();
    for (const coding of value.split(',')) {
      const token = coding.trim().toLowerCase();
      if (token !== '' && !supported.has(token)) return false;
    }
  }
  return true;
}
