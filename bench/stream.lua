-- The harness's request, streamed (OpenAI client): the relay decodes every chunk beside the copy.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
wrk.body = '{"model":"tiny","messages":[{"role":"user","content":"Write a function that adds two numbers."}],"max_tokens":16,"stream":true}'
