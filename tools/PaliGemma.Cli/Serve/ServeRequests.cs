using System.Globalization;
using System.Text.Json;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Http.Features;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Tasks;

namespace PaliGemma.Cli.Serve;

/// <summary>Checks shared by both request kinds: numbers in range, images that decode, sizes within the limits.</summary>
internal static class RequestChecks
{
    public static RgbImage DecodeImage(ReadOnlySpan<byte> bytes, string name, ServeOptions options)
    {
        if (bytes.IsEmpty) throw new RequestException(400, "no image: the image is empty");
        try
        {
            return ImageLoader.Decode(bytes, name, options.MaxImagePixels);
        }
        catch (Exception e) when (e is InvalidDataException or NotSupportedException)
        {
            throw new RequestException(400, $"bad image: {e.Message}");
        }
    }

    public static GenerationOptions Options(int maxNewTokens, float temperature, int topK, float topP, ulong seed) => new()
    {
        MaxNewTokens = maxNewTokens,
        Sampling = new SamplingOptions { Temperature = temperature, TopK = topK, TopP = topP, Seed = seed },
    };

    public static int Int(string name, string? text, int fallback, int min, int max)
    {
        if (text is null) return fallback;
        if (!int.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out int value) || value < min || value > max)
            throw new RequestException(400, $"{name} must be an integer between {min} and {max}, got '{Clip(text)}'");
        return value;
    }

    public static float Float(string name, string? text, float fallback, float min, float max)
    {
        if (text is null) return fallback;
        if (!float.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out float value) || !(value >= min && value <= max))
            throw new RequestException(400, $"{name} must be a number {Range(min, max)}, got '{Clip(text)}'");
        return value;
    }

    public static ulong ULong(string name, string? text)
    {
        if (text is null) return 0;
        if (!ulong.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out ulong value))
            throw new RequestException(400, $"{name} must be a non-negative integer, got '{Clip(text)}'");
        return value;
    }

    public static bool Bool(string name, string? text) => text switch
    {
        null => false,
        "true" or "1" or "True" => true,
        "false" or "0" or "False" or "" => false,
        _ => throw new RequestException(400, $"{name} must be true or false, got '{Clip(text)}'"),
    };

    /// <summary>Refuses a body whose declared length is over the limit before reading any of it.</summary>
    public static void CheckDeclaredLength(HttpRequest request, ServeOptions options)
    {
        if (request.ContentLength > options.MaxRequestBytes) throw new RequestException(413, PaliGemmaServer.TooLarge(options.MaxRequestBytes));
    }

    public static bool WantsEventStream(HttpRequest request) =>
        request.Headers.Accept.ToString().Contains("text/event-stream", StringComparison.OrdinalIgnoreCase);

    /// <summary>"between 0 and 100", or "above 0 and at most 1" for a range that excludes zero (top_p).</summary>
    public static string Range(float min, float max) =>
        min == float.Epsilon ? $"above 0 and at most {max}" : $"between {min} and {max}";

    public static string Clip(string text) => text.Length <= 40 ? text : text[..40] + "...";
}

/// <summary>
/// <c>POST /v1/generate</c>: multipart/form-data with an <c>image</c> file and either <c>prompt</c> or <c>task</c>
/// (caption|answer|detect|segment|ocr with <c>question</c>, <c>objects</c>, <c>lang</c>), plus optional
/// <c>max_new_tokens</c>, <c>temperature</c>, <c>top_k</c>, <c>top_p</c>, <c>seed</c>, <c>stream</c>.
/// </summary>
internal sealed record GenerateRequest(InferenceJob Job, bool Stream)
{
    /// <summary>Form text fields are small; this bounds a prompt before it is tokenized.</summary>
    private const int MaxFieldChars = 64 * 1024;

    private static readonly HashSet<string> KnownFields =
        ["image", "prompt", "task", "question", "objects", "lang", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stream"];

    public static async Task<GenerateRequest> ReadAsync(HttpContext context, ServeOptions options, PaliGemmaModel model, CancellationToken cancellationToken)
    {
        var request = context.Request;
        RequestChecks.CheckDeclaredLength(request, options);
        if (!request.HasFormContentType)
            throw new RequestException(415, "POST /v1/generate takes multipart/form-data: an 'image' file and a 'prompt' (or 'task') field");
        IFormCollection form;
        try
        {
            form = await request.ReadFormAsync(new FormOptions
            {
                MultipartBodyLengthLimit = options.MaxRequestBytes,
                ValueLengthLimit = MaxFieldChars,
                ValueCountLimit = 64,
            }, cancellationToken).ConfigureAwait(false);
        }
        catch (InvalidDataException e)
        {
            throw new RequestException(400, $"bad form: {e.Message}");
        }

        foreach (var key in form.Keys)
            if (!KnownFields.Contains(key)) throw new RequestException(400, $"unknown field '{RequestChecks.Clip(key)}'");
        var file = form.Files.GetFile("image") ?? (form.Files.Count > 0 ? form.Files[0] : null);
        if (file is null || file.Length == 0) throw new RequestException(400, "no image: send the image as a file part named 'image'");
        var bytes = new byte[file.Length];
        await using (var body = file.OpenReadStream())
            await body.ReadExactlyAsync(bytes, cancellationToken).ConfigureAwait(false);
        var image = RequestChecks.DecodeImage(bytes, string.IsNullOrEmpty(file.FileName) ? "image" : file.FileName, options);

        string? Field(string name) => form.TryGetValue(name, out var v) ? v.ToString() : null;
        string? prompt = Field("prompt"), taskName = Field("task");
        var task = PaliGemmaTask.Raw;
        if (prompt is not null && taskName is not null) throw new RequestException(400, "give either 'prompt' or 'task', not both");
        if (taskName is not null)
        {
            (prompt, task) = TaskPrompt(taskName, Field("question"), Field("objects"), Field("lang"));
        }
        else
        {
            if (string.IsNullOrWhiteSpace(prompt)) throw new RequestException(400, "no prompt: send a 'prompt' field (e.g. \"caption en\") or a 'task' field");
            foreach (var name in (ReadOnlySpan<string>)["question", "objects", "lang"])
                if (Field(name) is not null) throw new RequestException(400, $"'{name}' goes with 'task', not with 'prompt'");
        }

        int positions = model.Config.Text.MaxPositionEmbeddings;
        var generation = RequestChecks.Options(
            RequestChecks.Int("max_new_tokens", Field("max_new_tokens"), task == PaliGemmaTask.Segment ? 128 : 64, 1, Math.Min(options.MaxNewTokensLimit, positions)),
            RequestChecks.Float("temperature", Field("temperature"), 0f, 0f, 100f),
            RequestChecks.Int("top_k", Field("top_k"), 0, 0, int.MaxValue),
            RequestChecks.Float("top_p", Field("top_p"), 1f, float.Epsilon, 1f),
            RequestChecks.ULong("seed", Field("seed")));
        bool stream = RequestChecks.Bool("stream", Field("stream")) || RequestChecks.WantsEventStream(request);
        return new GenerateRequest(new InferenceJob(image, prompt!, generation), stream);
    }

    private static (string Prompt, PaliGemmaTask Task) TaskPrompt(string taskName, string? question, string? objects, string? lang)
    {
        try
        {
            return taskName switch
            {
                "caption" => (TaskPrompts.Caption(lang ?? TaskPrompts.DefaultLanguage), PaliGemmaTask.Caption),
                "answer" => (TaskPrompts.Answer(question ?? throw Missing("question", taskName), lang ?? TaskPrompts.DefaultLanguage), PaliGemmaTask.Answer),
                "detect" => (TaskPrompts.Detect(objects ?? throw Missing("objects", taskName)), PaliGemmaTask.Detect),
                "segment" => (TaskPrompts.Segment(objects ?? throw Missing("objects", taskName)), PaliGemmaTask.Segment),
                "ocr" => (TaskPrompts.Ocr(), PaliGemmaTask.Ocr),
                _ => throw new RequestException(400, $"unknown task '{RequestChecks.Clip(taskName)}': use caption, answer, detect, segment or ocr"),
            };
        }
        catch (ArgumentException e)
        {
            throw new RequestException(400, $"bad {taskName} request: {TaskSupport.OneLine(e.Message)}");
        }
    }

    private static RequestException Missing(string field, string task) => new(400, $"task '{task}' needs a '{field}' field");
}

/// <summary>
/// <c>POST /v1/chat/completions</c> in OpenAI's shape. PaliGemma answers one image and one prompt, so the prompt is the
/// text of the last user message and the image is the one <c>image_url</c> part (a <c>data:</c> URL) among the user
/// messages; system and assistant messages are accepted and ignored. Greedy unless temperature is given.
/// </summary>
internal sealed record ChatRequest(InferenceJob Job, bool Stream, bool IncludeUsage)
{
    public static async Task<ChatRequest> ReadAsync(HttpContext context, ServeOptions options, PaliGemmaModel model, CancellationToken cancellationToken)
    {
        var request = context.Request;
        RequestChecks.CheckDeclaredLength(request, options);
        if (!request.HasJsonContentType())
            throw new RequestException(415, "POST /v1/chat/completions takes application/json");
        JsonDocument document;
        try
        {
            document = await JsonDocument.ParseAsync(request.Body, default, cancellationToken).ConfigureAwait(false);
        }
        catch (JsonException e)
        {
            throw new RequestException(400, $"the body is not valid JSON: {e.Message}");
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw new RequestException(400, "the body must be a JSON object");
            if (!root.TryGetProperty("messages", out var messages) || messages.ValueKind != JsonValueKind.Array || messages.GetArrayLength() == 0)
                throw new RequestException(400, "'messages' must be a non-empty array");

            byte[]? imageBytes = null;
            string? prompt = null;
            foreach (var message in messages.EnumerateArray())
            {
                if (message.ValueKind != JsonValueKind.Object || !message.TryGetProperty("role", out var role) || role.ValueKind != JsonValueKind.String)
                    throw new RequestException(400, "each message needs a string 'role'");
                if (role.GetString() != "user") continue;
                if (!message.TryGetProperty("content", out var content)) throw new RequestException(400, "a user message needs 'content'");
                prompt = ReadContent(content, ref imageBytes);
            }
            if (prompt is null) throw new RequestException(400, "no user message");
            if (imageBytes is null)
                throw new RequestException(400, "no image: add a content part {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}");
            if (string.IsNullOrWhiteSpace(prompt)) throw new RequestException(400, "no prompt: the last user message has no text part");

            if (root.TryGetProperty("n", out var n) && !(n.ValueKind == JsonValueKind.Number && n.TryGetInt32(out int count) && count == 1))
                throw new RequestException(400, "'n' must be 1");
            int positions = model.Config.Text.MaxPositionEmbeddings;
            int maxTokensLimit = Math.Min(options.MaxNewTokensLimit, positions);
            int maxTokens = Int(root, "max_completion_tokens", Int(root, "max_tokens", 64, 1, maxTokensLimit), 1, maxTokensLimit);
            var generation = RequestChecks.Options(
                maxTokens,
                Float(root, "temperature", 0f, 0f, 100f),
                Int(root, "top_k", 0, 0, int.MaxValue),
                Float(root, "top_p", 1f, float.Epsilon, 1f),
                root.TryGetProperty("seed", out var seed) && seed.ValueKind != JsonValueKind.Null
                    ? seed.TryGetUInt64(out ulong s) ? s : throw new RequestException(400, "seed must be a non-negative integer")
                    : 0);
            bool stream = Bool(root, "stream");
            bool includeUsage = root.TryGetProperty("stream_options", out var so) && so.ValueKind == JsonValueKind.Object && Bool(so, "include_usage");
            var image = RequestChecks.DecodeImage(imageBytes, "image_url", options);
            return new ChatRequest(new InferenceJob(image, prompt.Trim(), generation), stream, includeUsage);
        }
    }

    /// <summary>Reads a user message's content (a string, or text and image_url parts) and returns its text.</summary>
    private static string ReadContent(JsonElement content, ref byte[]? imageBytes)
    {
        if (content.ValueKind == JsonValueKind.String) return content.GetString()!;
        if (content.ValueKind != JsonValueKind.Array) throw new RequestException(400, "'content' must be a string or an array of parts");
        var text = new List<string>();
        foreach (var part in content.EnumerateArray())
        {
            string? type = part.ValueKind == JsonValueKind.Object && part.TryGetProperty("type", out var t) && t.ValueKind == JsonValueKind.String ? t.GetString() : null;
            switch (type)
            {
                case "text":
                    if (!part.TryGetProperty("text", out var value) || value.ValueKind != JsonValueKind.String)
                        throw new RequestException(400, "a text part needs a string 'text'");
                    text.Add(value.GetString()!);
                    break;
                case "image_url":
                    if (imageBytes is not null) throw new RequestException(400, "PaliGemma takes one image per request; the messages hold more than one");
                    imageBytes = DataUrl(part);
                    break;
                default:
                    throw new RequestException(400, $"unsupported content part type '{RequestChecks.Clip(type ?? "(none)")}': use text or image_url");
            }
        }
        return string.Join(' ', text);
    }

    /// <summary>The bytes of an image_url part: only <c>data:[type];base64,...</c> URLs, the server fetches nothing.</summary>
    private static byte[] DataUrl(JsonElement part)
    {
        if (!part.TryGetProperty("image_url", out var imageUrl)) throw new RequestException(400, "an image_url part needs 'image_url'");
        var urlElement = imageUrl.ValueKind == JsonValueKind.Object && imageUrl.TryGetProperty("url", out var u) ? u : imageUrl;
        if (urlElement.ValueKind != JsonValueKind.String) throw new RequestException(400, "image_url.url must be a string");
        string url = urlElement.GetString()!;
        if (!url.StartsWith("data:", StringComparison.OrdinalIgnoreCase))
            throw new RequestException(400, "image_url must be a data: URL (data:image/png;base64,...); the server does not fetch URLs");
        int comma = url.IndexOf(',');
        if (comma < 0 || !url.AsSpan(5, comma - 5).EndsWith(";base64", StringComparison.OrdinalIgnoreCase))
            throw new RequestException(400, "image_url data: URL must be base64 (data:image/png;base64,...)");
        try
        {
            return Convert.FromBase64String(url[(comma + 1)..]);
        }
        catch (FormatException)
        {
            throw new RequestException(400, "image_url data: URL holds invalid base64");
        }
    }

    private static int Int(JsonElement root, string name, int fallback, int min, int max)
    {
        if (!root.TryGetProperty(name, out var e) || e.ValueKind == JsonValueKind.Null) return fallback;
        if (e.ValueKind != JsonValueKind.Number || !e.TryGetInt32(out int value) || value < min || value > max)
            throw new RequestException(400, $"{name} must be an integer between {min} and {max}, got {RequestChecks.Clip(e.GetRawText())}");
        return value;
    }

    private static float Float(JsonElement root, string name, float fallback, float min, float max)
    {
        if (!root.TryGetProperty(name, out var e) || e.ValueKind == JsonValueKind.Null) return fallback;
        if (e.ValueKind != JsonValueKind.Number || !e.TryGetDouble(out double value) || !(value >= min && value <= max))
            throw new RequestException(400, $"{name} must be a number {RequestChecks.Range(min, max)}, got {RequestChecks.Clip(e.GetRawText())}");
        return (float)value;
    }

    private static bool Bool(JsonElement root, string name)
    {
        if (!root.TryGetProperty(name, out var e) || e.ValueKind == JsonValueKind.Null) return false;
        return e.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw new RequestException(400, $"{name} must be true or false"),
        };
    }
}
