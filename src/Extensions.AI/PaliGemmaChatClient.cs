using System.Runtime.CompilerServices;
using Microsoft.Extensions.AI;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Serving;

namespace PaliGemma.CpuOnly.Extensions.AI;

/// <summary>
/// An <see cref="IChatClient"/> over a <see cref="PaliGemmaService"/>: the image (a <see cref="DataContent"/> with an
/// <c>image/*</c> media type) and the text of the last user message go in, the model's answer comes out, whole or streamed.
/// </summary>
/// <remarks>
/// PaliGemma answers one image and one prompt; it has no chat template and no memory of earlier turns. Only the last
/// <see cref="ChatRole.User"/> message is read: system messages, <see cref="ChatOptions.Instructions"/>, assistant turns and
/// earlier user turns are ignored, so a chat UI that resends the history still works but the model does not see it.
/// <see cref="ChatOptions"/> map to <see cref="GenerationOptions"/>: MaxOutputTokens, Temperature, TopK, TopP and Seed;
/// tools, stop sequences, penalties and response formats are not supported and are ignored.
/// Thread-safe: concurrent calls share the service's session limit.
/// </remarks>
public sealed class PaliGemmaChatClient : IChatClient
{
    private readonly bool _ownsService;
    private readonly GenerationOptions _defaults;
    private readonly ChatClientMetadata _metadata;

    /// <param name="service">The loaded model; disposed with this client only when <paramref name="ownsService"/> is set.</param>
    /// <param name="defaults">Generation settings used where <see cref="ChatOptions"/> leave a value unset (default: 64 new tokens, greedy).</param>
    /// <param name="modelId">Reported as the model id; default: the checkpoint folder's name.</param>
    public PaliGemmaChatClient(PaliGemmaService service, GenerationOptions? defaults = null, string? modelId = null, bool ownsService = false)
    {
        ArgumentNullException.ThrowIfNull(service);
        Service = service;
        _defaults = defaults ?? new GenerationOptions();
        _defaults.Validate();
        _ownsService = ownsService;
        ModelId = modelId ?? Path.GetFileName(Path.TrimEndingDirectorySeparator(service.Model.Directory));
        _metadata = new ChatClientMetadata("PaliGemma.CpuOnly", providerUri: null, ModelId);
    }

    public PaliGemmaService Service { get; }
    public string ModelId { get; }

    public async Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var (request, generation) = ToRequest(messages, options);
        var result = await Service.GenerateAsync(request, generation, cancellationToken).ConfigureAwait(false);
        return new ChatResponse(new ChatMessage(ChatRole.Assistant, result.Text))
        {
            ModelId = ModelId,
            FinishReason = result.StoppedAtEos ? ChatFinishReason.Stop : ChatFinishReason.Length,
            Usage = Usage(result.PromptIds.Length, result.GeneratedIds.Length),
        };
    }

    public async IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var (request, generation) = ToRequest(messages, options);
        int promptTokens = Service.Model.Tokenizer.BuildPrompt(request.Prompt, Service.Model.NumImageTokens).Length;
        string responseId = Guid.NewGuid().ToString("N");
        int generated = 0;
        await foreach (var token in Service.StreamAsync(request, generation, cancellationToken).ConfigureAwait(false))
        {
            generated++;
            bool last = token.IsEnd || generated == generation.MaxNewTokens;
            if (!last)
            {
                if (token.Text.Length > 0) yield return Update(responseId, [new TextContent(token.Text)]);
                continue;
            }
            List<AIContent> contents = token.Text.Length > 0 ? [new TextContent(token.Text)] : [];
            contents.Add(new UsageContent(Usage(promptTokens, generated)));
            var final = Update(responseId, contents);
            final.FinishReason = token.IsEnd ? ChatFinishReason.Stop : ChatFinishReason.Length;
            yield return final;
        }
    }

    public object? GetService(Type serviceType, object? serviceKey = null)
    {
        ArgumentNullException.ThrowIfNull(serviceType);
        if (serviceKey is not null) return null;
        if (serviceType == typeof(ChatClientMetadata)) return _metadata;
        if (serviceType.IsInstanceOfType(this)) return this;
        if (serviceType.IsInstanceOfType(Service)) return Service;
        if (serviceType.IsInstanceOfType(Service.Model)) return Service.Model;
        return null;
    }

    public void Dispose()
    {
        if (_ownsService) Service.DisposeAsync().AsTask().GetAwaiter().GetResult();
    }

    /// <summary>The request a conversation maps to: the last user message's text and image, and generation settings from <paramref name="options"/>.</summary>
    /// <exception cref="ArgumentException">There is no user message, or it does not hold exactly one image as <see cref="DataContent"/>.</exception>
    public (GenerationRequest Request, GenerationOptions Options) ToRequest(IEnumerable<ChatMessage> messages, ChatOptions? options)
    {
        ArgumentNullException.ThrowIfNull(messages);
        ChatMessage? user = null;
        foreach (var message in messages)
            if (message.Role == ChatRole.User) user = message;
        if (user is null)
            throw new ArgumentException("the conversation has no user message; PaliGemma needs one holding the prompt and an image", nameof(messages));

        DataContent? image = null;
        foreach (var content in user.Contents)
        {
            if (content is DataContent data && data.HasTopLevelMediaType("image"))
            {
                if (image is not null)
                    throw new ArgumentException("the last user message holds more than one image; PaliGemma takes exactly one", nameof(messages));
                image = data;
            }
            else if (content is UriContent uri && uri.HasTopLevelMediaType("image"))
            {
                throw new ArgumentException($"the image '{uri.Uri}' is a link; PaliGemma.CpuOnly reads images only as DataContent (load the bytes first, e.g. DataContent.LoadFromAsync)", nameof(messages));
            }
        }
        if (image is null)
            throw new ArgumentException("the last user message holds no image; add the picture as a DataContent with an image/* media type", nameof(messages));

        RgbImage rgb = ImageLoader.Decode(image.Data.Span, image.Name ?? $"chat image ({image.MediaType})");
        return (new GenerationRequest(rgb, user.Text), ToGenerationOptions(options));
    }

    private GenerationOptions ToGenerationOptions(ChatOptions? options)
    {
        if (options is null) return _defaults;
        var sampling = _defaults.Sampling;
        sampling = sampling with
        {
            Temperature = options.Temperature ?? sampling.Temperature,
            TopK = options.TopK ?? sampling.TopK,
            TopP = options.TopP ?? sampling.TopP,
            Seed = options.Seed is { } seed ? unchecked((ulong)seed) : sampling.Seed,
        };
        var generation = _defaults with
        {
            MaxNewTokens = options.MaxOutputTokens ?? _defaults.MaxNewTokens,
            Sampling = sampling,
        };
        generation.Validate();
        return generation;
    }

    private ChatResponseUpdate Update(string responseId, IList<AIContent> contents) =>
        new(ChatRole.Assistant, contents) { ResponseId = responseId, MessageId = responseId, ModelId = ModelId };

    private static UsageDetails Usage(int promptTokens, int generatedTokens) => new()
    {
        InputTokenCount = promptTokens,
        OutputTokenCount = generatedTokens,
        TotalTokenCount = promptTokens + generatedTokens,
    };
}
