// Drives a gemserve server with the Vercel AI SDK (@ai-sdk/google), unmodified apart from its base URL.
//
//   GEMSERVE_URL=http://127.0.0.1:8080 node aisdk_smoke.mjs
//
// Prints one JSON object with what came back; exits non-zero on any error. tests/api/test_js_client.py runs it.

import { createGoogleGenerativeAI } from "@ai-sdk/google";
import { generateObject, generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const google = createGoogleGenerativeAI({ baseURL: `${process.env.GEMSERVE_URL}/v1beta`, apiKey: "anything" });
const model = google("gemini-2.5-flash");
const settings = { maxOutputTokens: 120, temperature: 0 };

const plain = await generateText({ model, prompt: "Say hello in one short sentence.", ...settings });

const cities = [];
const withTool = await generateText({
  model,
  prompt: "What is the weather in Paris?",
  tools: {
    getWeather: tool({
      description: "Get the current weather for a city.",
      inputSchema: z.object({ city: z.string() }),
      execute: async ({ city }) => {
        cities.push(city);
        return { city, temperatureC: 22, sky: "sunny" };
      },
    }),
  },
  stopWhen: stepCountIs(3),
  ...settings,
});

const object = await generateObject({
  model,
  schema: z.object({ name: z.string(), age: z.number().int() }),
  prompt: "Alice is 30 years old. Extract the person.",
  ...settings,
});

const streamed = streamText({ model, prompt: "Count from 1 to 5.", ...settings });
const parts = [];
for await (const part of streamed.textStream) {
  parts.push(part);
}

console.log(JSON.stringify({
  plain: { text: plain.text, finishReason: plain.finishReason },
  tool: { cities, steps: withTool.steps.length, text: withTool.text, finishReason: withTool.finishReason },
  object: object.object,
  stream: { parts: parts.length, text: parts.join(""), finishReason: await streamed.finishReason },
}));
