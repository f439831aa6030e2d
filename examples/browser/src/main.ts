// A PRANA-style bucket bridge: sends 5-second cognitive-state windows to the
// bucket over gRPC-web with Connect-ES, as PRANA's bucket_bridge.js does
// over REST. Query string: ?bucket=http://host:3000&user=...&n=5&token=...
// (token: an ingest token, sent as `authorization: Bearer ...`).
import {
  ConnectError,
  createBucketClient,
  Role,
  SystemType,
  timestampFromDate,
} from "@prana/bucket-client";

const params = new URLSearchParams(location.search);
const baseUrl = params.get("bucket") ?? "http://localhost:3000";
const user = params.get("user") ?? "prana_demo";
const n = Number(params.get("n") ?? "5");
const token = params.get("token");


/** One 5-second window: the three seconds add up to 5.0. */
function window5s(i: number) {
  const active = 3 + (i % 3) * 0.5;
  return {
    userId: user,
    sessionId: "browser-session",
    lessonId: "lesson-1",
    systemType: SystemType.GURUKUL,
    role: Role.STUDENT,
    timestamp: timestampFromDate(new Date()),
    cognitiveState: i % 2 === 0 ? "DEEP_FOCUS" : "ON_TASK",
    activeSeconds: active,
    idleSeconds: 4.5 - active,
    awaySeconds: 0.5,
    focusScore: 60 + (i % 40),
    rawSignals: { dwell_time_ms: 1200 + i, mouse_velocity: 0.5, source: "browser" },
  };
}

let step = "start";

async function run() {
  // Binary protobuf framing. (Connect-ES's non-binary gRPC-web mode is JSON,
  // which tonic does not speak; grpc-web-text is covered by the Rust tests.)
  const binary = createBucketClient(baseUrl, { token: token ?? undefined });

  const ingested: string[] = [];
  for (let i = 0; i < n; i++) {
    const receipt = await binary.ingest({ packet: window5s(i) });
    ingested.push(receipt.packetId);
  }
  step = "ingestBatch";
  const batch = await binary.ingestBatch({ packets: [window5s(100), window5s(101)] });

  let invalidCode = 0;
  let invalidMessage = "";
  try {
    await binary.ingest({ packet: { ...window5s(0), focusScore: 250 } });
  } catch (e) {
    const err = ConnectError.from(e);
    invalidCode = err.code;
    invalidMessage = err.rawMessage;
  }

  step = "status";
  const status = await binary.status({});
  return {
    ingested,
    batchIngested: batch.ingested,
    invalidCode,
    invalidMessage,
    totalPackets: Number(status.totalPackets),
  };
}

declare global {
  interface Window {
    __result?: unknown;
  }
}

document.getElementById("bucket")!.textContent = baseUrl;
run()
  .then((result) => {
    window.__result = result;
    document.getElementById("result")!.textContent = JSON.stringify(result, null, 2);
  })
  .catch((e) => {
    window.__result = { error: `${step}: ${String(e)}` };
    document.getElementById("result")!.textContent = String(e);
  });
