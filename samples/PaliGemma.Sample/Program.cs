// Consumes the PaliGemma.CpuOnly packages as an application would: one service shared by concurrent requests,
// token streaming, and the same model behind Microsoft.Extensions.AI's IChatClient.
// Usage: PaliGemma.Sample <model folder> <image> [prompt]
using Microsoft.Extensions.AI;
using PaliGemma.CpuOnly.Extensions.AI;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Serving;

if (args.Length < 2)
{
    Console.Error.WriteLine("usage: PaliGemma.Sample <model folder> <image> [prompt]");
    return 2;
}
string modelDirectory = args[0], imagePath = args[1], prompt = args.Length > 2 ? args[2] : "caption en";
using var cancel = new CancellationTokenSource();
Console.CancelKeyPress += (_, e) => { e.Cancel = true; cancel.Cancel(); };

await using var service = await PaliGemmaService.LoadAsync(modelDirectory,
    new PaliGemmaServiceOptions { MaxConcurrentSessions = 2 }, cancel.Token);
var request = new GenerationRequest(ImageLoader.Load(imagePath), prompt);
var options = new GenerationOptions { MaxNewTokens = 16 };

Console.Write("stream:   ");
await foreach (var token in service.StreamAsync(request, options, cancel.Token))
    Console.Write(token.Text);
Console.WriteLine();

// Four sampled requests at once over two sessions; each seed gives the same answer however they interleave.
var sampled = Enumerable.Range(1, 4).Select(seed => service.GenerateAsync(request,
    options with { Sampling = new SamplingOptions { Temperature = 1f, TopK = 40, Seed = (ulong)seed } }, cancel.Token));
foreach (var (result, i) in (await Task.WhenAll(sampled)).Select((r, i) => (r, i)))
    Console.WriteLine($"seed {i + 1}:   {result.Text}");

using IChatClient client = new PaliGemmaChatClient(service);
var message = new ChatMessage(ChatRole.User,
    [new TextContent(prompt), new DataContent(await File.ReadAllBytesAsync(imagePath, cancel.Token), MediaType(imagePath))]);
var response = await client.GetResponseAsync([message], new ChatOptions { MaxOutputTokens = 16 }, cancel.Token);
Console.WriteLine($"chat:     {response.Text} (finish: {response.FinishReason}, tokens: {response.Usage?.InputTokenCount} in, {response.Usage?.OutputTokenCount} out)");
return 0;

static string MediaType(string path) => Path.GetExtension(path).ToLowerInvariant() switch
{
    ".jpg" or ".jpeg" => "image/jpeg",
    ".gif" => "image/gif",
    ".bmp" => "image/bmp",
    ".webp" => "image/webp",
    _ => "image/png",
};
