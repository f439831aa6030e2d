// The PRANA bucket's browser client: gRPC-web (binary framing, which tonic
// serves) through Connect-ES, with the contract's generated types. PRANA's
// front end depends on this package rather than generating its own.
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { BucketService } from "./gen/bucket/v1/bucket_pb.js";

export * from "./gen/bucket/v1/bucket_pb.js";
export { ConnectError, Code } from "@connectrpc/connect";
export { timestampFromDate } from "@bufbuild/protobuf/wkt";

/** A client of the bucket's BucketService. */
export type BucketClient = Client<typeof BucketService>;

/** Options for {@link createBucketClient}. */
export interface BucketClientOptions {
  /** A token of the role the calls need (ingest for PRANA's pages). */
  token?: string;
}

/** `authorization: Bearer <token>` on every call. */
function bearer(token: string): Interceptor {
  return (next) => async (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}

/**
 * A client of the bucket at `baseUrl` (e.g. `https://bucket.example:3000`),
 * over gRPC-web with binary framing. The bucket must allow the page's
 * origin (BUCKET_CORS_ORIGINS).
 */
export function createBucketClient(baseUrl: string, options: BucketClientOptions = {}): BucketClient {
  const interceptors = options.token ? [bearer(options.token)] : [];
  return createClient(
    BucketService,
    createGrpcWebTransport({ baseUrl, useBinaryFormat: true, interceptors }),
  );
}
