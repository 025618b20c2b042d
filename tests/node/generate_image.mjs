// The Vercel AI SDK as its users call it: `generateImage` with `openai.image(MODEL)`, configured
// only by OPENAI_BASE_URL and OPENAI_API_KEY (as README "Pointing clients at it" says), default
// retries included. One call per model named on the command line; one JSON line per call on
// stdout: the images it returned (media type, size, sha256) and the gateway's budget header, or
// the error it threw. Exit status 1 if any call failed.
import { createHash } from "node:crypto";

import { openai } from "@ai-sdk/openai";
import { generateImage } from "ai";

let failed = false;
for (const model of process.argv.slice(2)) {
  try {
    const result = await generateImage({ model: openai.image(model), prompt: `a kite (${model})` });
    const headers = result.responses.map((response) => response.headers ?? {});
    console.log(
      JSON.stringify({
        model,
        images: result.images.map((image) => ({
          mediaType: image.mediaType,
          bytes: image.uint8Array.length,
          sha256: createHash("sha256").update(image.uint8Array).digest("hex"),
        })),
        budgetRemaining: headers.map((h) => h["x-gateway-budget-remaining"] ?? null),
        warnings: result.warnings,
      }),
    );
  } catch (error) {
    failed = true;
    console.log(JSON.stringify({ model, error: `${error.name}: ${error.message}` }));
  }
}
process.exit(failed ? 1 : 0);
