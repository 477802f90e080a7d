using Microsoft.Extensions.AI;
using PaliGemma.CpuOnly.Extensions.AI;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Serving;
using PaliGemma.CpuOnly.Tests.Golden;
using PaliGemma.CpuOnly.Tests.Tensors;

namespace PaliGemma.CpuOnly.Tests.Serving;

/// <summary>The runtime seen through Microsoft.Extensions.AI's <see cref="IChatClient"/> only.</summary>
public sealed class PaliGemmaChatClientTests
{
    private const string Case = "tiny-mqa-56";

    private static PaliGemmaModel Model => GoldenData.Model(Case);

    private static byte[] ImageBytes(string file) => File.ReadAllBytes(Path.Combine(TestPaths.Golden, Case, file));

    private static IChatClient Client() => new PaliGemmaChatClient(new PaliGemmaService(Model), ownsService: true);

    private static ChatMessage UserMessage(string prompt, string file, string mediaType) =>
        new(ChatRole.User, [new TextContent(prompt), new DataContent(ImageBytes(file), mediaType)]);

    private static GenerationResult Reference(string prompt, string file, GenerationOptions options) =>
        new PaliGemmaGenerator(Model).Generate(new GenerationRequest(ImageLoader.Decode(ImageBytes(file), file), prompt), options);

    [Fact]
    public async Task Response_text_equals_the_generator_text()
    {
        using var client = Client();
        var expected = Reference("caption en", "rgb_640x480.png", new GenerationOptions { MaxNewTokens = 16 });

        var response = await client.GetResponseAsync([UserMessage("caption en", "rgb_640x480.png", "image/png")], new ChatOptions { MaxOutputTokens = 16 });

        Assert.Equal(expected.Text, response.Text);
        Assert.Equal(ChatRole.Assistant, response.Messages.Single().Role);
        Assert.Equal(expected.StoppedAtEos ? ChatFinishReason.Stop : ChatFinishReason.Length, response.FinishReason);
        Assert.Equal(expected.GeneratedIds.Length, response.Usage?.OutputTokenCount);
        Assert.Equal(expected.PromptIds.Length, response.Usage?.InputTokenCount);
    }

    [Fact]
    public async Task Chat_options_map_to_sampling_and_streamed_updates_concatenate_to_the_response()
    {
        using var client = Client();
        var chatOptions = new ChatOptions { MaxOutputTokens = 9, Temperature = 1f, TopK = 40, TopP = 0.95f, Seed = 1234 };
        var expected = Reference("describe en", "rgb_123x457.jpg", new GenerationOptions
        {
            MaxNewTokens = 9,
            Sampling = new SamplingOptions { Temperature = 1f, TopK = 40, TopP = 0.95f, Seed = 1234 },
        });
        var greedy = Reference("describe en", "rgb_123x457.jpg", new GenerationOptions { MaxNewTokens = 9 });
        Assert.NotEqual(greedy.GeneratedIds, expected.GeneratedIds);   // the options must matter for this test to mean anything

        ChatMessage[] messages = [UserMessage("describe en", "rgb_123x457.jpg", "image/jpeg")];
        var response = await client.GetResponseAsync(messages, chatOptions);
        var updates = new List<ChatResponseUpdate>();
        await foreach (var update in client.GetStreamingResponseAsync(messages, chatOptions)) updates.Add(update);

        Assert.Equal(expected.Text, response.Text);
        Assert.Equal(expected.Text, string.Concat(updates.Select(u => u.Text)));
        Assert.Equal(response.FinishReason, updates[^1].FinishReason);
        Assert.All(updates.SkipLast(1), u => Assert.Null(u.FinishReason));
        Assert.Equal(expected.Text, updates.ToChatResponse().Text);
    }

    [Fact]
    public async Task Only_the_last_user_message_is_read()
    {
        using var client = Client();
        var options = new ChatOptions { MaxOutputTokens = 8, Temperature = 1f, Seed = 3 };
        var alone = await client.GetResponseAsync([UserMessage("caption en", "gray_200x150.png", "image/png")], options);
        var afterHistory = await client.GetResponseAsync(
        [
            new ChatMessage(ChatRole.System, "You are terse."),
            UserMessage("describe en", "rgb_640x480.png", "image/png"),
            new ChatMessage(ChatRole.Assistant, "something"),
            UserMessage("caption en", "gray_200x150.png", "image/png"),
        ], options);
        Assert.Equal(alone.Text, afterHistory.Text);
    }

    [Fact]
    public async Task A_user_message_without_an_image_is_rejected_clearly()
    {
        using var client = Client();
        var error = await Assert.ThrowsAsync<ArgumentException>(() => client.GetResponseAsync([new ChatMessage(ChatRole.User, "caption en")]));
        Assert.Contains("no image", error.Message);
        Assert.Equal("messages", error.ParamName);

        // The image must be in the last user message, not an earlier one.
        var stale = await Assert.ThrowsAsync<ArgumentException>(async () =>
        {
            await foreach (var _ in client.GetStreamingResponseAsync([UserMessage("caption en", "rgb_640x480.png", "image/png"), new ChatMessage(ChatRole.User, "and now?")]))
            {
            }
        });
        Assert.Contains("no image", stale.Message);

        var noUser = await Assert.ThrowsAsync<ArgumentException>(() => client.GetResponseAsync([new ChatMessage(ChatRole.System, "hi")]));
        Assert.Contains("no user message", noUser.Message);
    }

    [Fact]
    public void Metadata_and_services_are_exposed()
    {
        using var client = Client();
        var metadata = client.GetService<ChatClientMetadata>();
        Assert.NotNull(metadata);
        Assert.Equal(Case, metadata.DefaultModelId);
        Assert.Same(Model, client.GetService<PaliGemmaModel>());
        Assert.NotNull(client.GetService<PaliGemmaService>());
    }
}
