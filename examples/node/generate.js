#!/usr/bin/env node
// Streams a generation from the llamafleet gateway over gRPC, with the contract loaded at run
// time from protos/ (no generated code). Tokens go to stdout as they arrive; the final result
// (finish reason, usage, timings, worker) goes to stderr.
//
//   node generate.js "hello" [--max-tokens 32] [--address 127.0.0.1:50051] [--timeout-ms 60000]
//
// LLAMAFLEET_API_KEY, when set, is sent as `authorization: Bearer <key>`.
"use strict";

const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = process.env.LLAMAFLEET_PROTOS || path.resolve(__dirname, "../../protos");

function loadGateway() {
  const definition = protoLoader.loadSync("llamafleet/v1/gateway.proto", {
    includeDirs: [PROTOS],
    keepCase: true, // field names as in the .proto: max_tokens, finish_reason
    longs: String, // uint64 seeds do not fit a JS number
    enums: String,
    defaults: true,
    oneofs: true, // event.event names the member that is set: "chunk" or "result"
  });
  return grpc.loadPackageDefinition(definition).llamafleet.v1.Gateway;
}

function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      address: { type: "string", default: process.env.LLAMAFLEET_GATEWAY || "127.0.0.1:50051" },
      "max-tokens": { type: "string", default: "32" },
      "timeout-ms": { type: "string", default: "60000" },
    },
  });
  const Gateway = loadGateway();
  const client = new Gateway(values.address, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (process.env.LLAMAFLEET_API_KEY) {
    metadata.set("authorization", `Bearer ${process.env.LLAMAFLEET_API_KEY}`);
  }
  const request = { prompt: positionals[0] || "hello", max_tokens: Number(values["max-tokens"]) };
  // The deadline travels with the call: the gateway and the scheduler stop the generation when it passes.
  const call = client.Generate(request, metadata, { deadline: Date.now() + Number(values["timeout-ms"]) });

  call.on("data", (event) => {
    if (event.event === "chunk") {
      process.stdout.write(event.chunk.text);
    } else {
      const { finish_reason, usage, timings, worker } = event.result;
      process.stdout.write("\n");
      console.error(
        `finish ${finish_reason} · ${usage.completion_tokens} tokens · TTFT ${timings.ttft_ms.toFixed(1)} ms · ` +
          `${timings.per_token_ms.toFixed(2)} ms/token · worker ${worker}`,
      );
    }
  });
  call.on("error", (err) => {
    const retryAfter = err.metadata ? err.metadata.get("retry-after")[0] : undefined;
    console.error(`\n${grpc.status[err.code]}: ${err.details}${retryAfter ? ` (retry after ${retryAfter} s)` : ""}`);
    process.exitCode = 1;
  });
  call.on("end", () => client.close());
}

main();
